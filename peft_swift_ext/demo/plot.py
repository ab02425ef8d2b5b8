"""The demo's loss-curve PNG."""

from __future__ import annotations

from pathlib import Path
from statistics import fmean


def plot_losses(
    train_losses: list[float], heldout_before: float, heldout_after: float, path: Path, title: str
) -> None:
    """Write the per-step training loss, its running mean and the held-out loss before/after training.

    Args:
        train_losses: training loss of each step.
        heldout_before: held-out loss of the untrained adapters (drawn at step 0).
        heldout_after: held-out loss after the last step.
        path: the PNG to write (its folder is created).
        title: the figure title.
    """
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    steps = list(range(1, len(train_losses) + 1))
    window = max(1, len(train_losses) // 10)
    smoothed = [fmean(train_losses[max(0, i - window + 1) : i + 1]) for i in range(len(train_losses))]
    figure, axes = plt.subplots(figsize=(7, 4), dpi=100)
    axes.plot(steps, train_losses, color="tab:blue", alpha=0.35, label="train loss (per step)")
    axes.plot(steps, smoothed, color="tab:blue", label=f"train loss (mean of last {window})")
    axes.plot(
        [0, len(train_losses)],
        [heldout_before, heldout_after],
        "o--",
        color="tab:red",
        label=f"held-out loss: {heldout_before:.3f} -> {heldout_after:.3f}",
    )
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("cross-entropy per response token")
    axes.set_title(title)
    axes.set_ylim(bottom=0)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)
