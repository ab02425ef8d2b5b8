"""The suite's markdown table and PNG charts, from its JSON result."""

from __future__ import annotations

from pathlib import Path

COLUMNS = (
    "| tuner | model | side | trainable params | step (ms) | ×base fwd+bwd | peak step MiB | save (ms) | load (ms) "
    "| merged fwd ×base |"
)
SIDES = {"peft": "ours (get_peft_model)", "swift_api": "ours (Swift.prepare_model)", "ms_swift": "ms-swift"}


def _ms(seconds) -> str:
    return "–" if seconds is None else f"{1000 * seconds:.1f}"


def summary(results: dict) -> str:
    """One row per tuner: the comparison the README shows."""
    lines = [
        "| tuner | model | trainable | step ×base (ours) | step ours ÷ ms-swift | ×base ours ÷ ms-swift "
        "| peak MiB ours / ms-swift (base) | save / load ms (ours) | merged fwd ×base |",
        "|---" * 9 + "|",
    ]
    for tuner, rows in results["tuners"].items():
        ours, theirs, base = rows["peft"], rows.get("ms_swift"), rows["base"]
        versus = f"{ours['step_s'] / theirs['step_s']:.2f}" if theirs else "–"
        overhead = f"{ours['step_vs_base'] / theirs['step_vs_base']:.2f}" if theirs else "–"
        theirs_peak = f"{theirs['peak_mib']:.1f}" if theirs else "–"
        merged = rows.get("merged", {}).get("vs_base")
        lines.append(
            f"| {tuner} | {results['tuner_notes'][tuner]['family']} | {ours['trainable']:,} | "
            f"{ours['step_vs_base']:.2f} | {versus} | {overhead} | {ours['peak_mib']:.1f} / {theirs_peak} "
            f"({base['peak_mib']:.1f}) | "
            f"{_ms(ours['save_s'])} / {_ms(ours['load_s'])} | {'–' if merged is None else f'{merged:.2f}'} |"
        )
    return "\n".join(lines) + "\n"


def markdown(results: dict) -> str:
    machine = results["machine"]
    load = machine["load_average_at_start"][0], machine["load_average_at_end"][0]
    lines = [
        f"Machine: {machine['cpu']}, {machine['cores']} cores, {machine['threads']} torch threads; "
        f"load average {load[0]:.1f} at start, {load[1]:.1f} at end; "
        f"medians of {results['repeats']} interleaved rounds after one warm-up.",
        "",
        "Versions: "
        + "; ".join(
            f"{'ours' if side == 'ours' else 'ms-swift venv'}: " + ", ".join(f"{k} {v}" for k, v in found.items())
            for side, found in results["versions"].items()
        )
        + ".",
        "",
        "Models: " + "; ".join(f"{family}: {text}" for family, text in results["models"].items()) + ".",
        "",
        summary(results),
        "All sides:",
        "",
        COLUMNS,
        "|" + "---|" * (COLUMNS.count("|") - 1),
    ]
    for tuner, rows in results["tuners"].items():
        family = results["tuner_notes"][tuner]["family"]
        base = rows["base"]
        base_cells = f"0 | {_ms(base['step_s'])} | 1.00 | {base['peak_mib']:.1f} | – | – | –"
        lines.append(f"| {tuner} | {family} | frozen base | {base_cells} |")
        if "ms_swift_base" in rows:
            swift_base = rows["ms_swift_base"]
            cells = f"0 | {_ms(swift_base['step_s'])} | 1.00 | {swift_base['peak_mib']:.1f} | – | – | –"
            lines.append(f"| {tuner} | {family} | frozen base (ms-swift venv) | {cells} |")
        for side, label in SIDES.items():
            if side not in rows:
                continue
            row = rows[side]
            merged = rows.get("merged", {}).get("vs_base") if side == "peft" else None
            lines.append(
                f"| {tuner} | {family} | {label} | {row['trainable']:,} | {_ms(row['step_s'])} | "
                f"{row['step_vs_base']:.2f} | {row['peak_mib']:.1f} | {_ms(row['save_s'])} | {_ms(row['load_s'])} | "
                f"{'–' if merged is None else f'{merged:.2f}'} |"
            )
    if results.get("scaling"):
        lines += ["", "Scaling (ours through get_peft_model; ×base = step time over the frozen base's fwd+bwd):", ""]
        lines += ["| tuner | axis | x | step (ms) | ×base | peak step MiB | base peak MiB |", "|---" * 7 + "|"]
        for tuner, curves in results["scaling"].items():
            for axis, points in curves.items():
                for p in points:
                    lines.append(
                        f"| {tuner} | {axis} | {p['x']} | {_ms(p['step_s'])} | {p['step_vs_base']:.2f} | "
                        f"{p['peak_mib']:.1f} | {p['base_peak_mib']:.1f} |"
                    )
    if results.get("targets"):
        shim = results.get("shim")
        if shim:
            lines += ["", f"Shim figures: benchmarks/swift_overhead.py ({shim['size']} size: {shim['model']})."]
        lines += ["", "| target | measured | bound | met |", "|---|---|---|---|"]
        for name, t in results["targets"].items():
            lines.append(f"| {name} | {t['measured']:.4g} | ≤ {t['bound']} | {'yes' if t['met'] else '**no**'} |")
    for note in results.get("notes", []):
        lines += ["", f"Note: {note}"]
    return "\n".join(lines) + "\n"


def charts(results: dict, folder: Path, suffix: str = "") -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FormatStrFormatter

    written = []
    tuners = list(results["tuners"])
    sides = [s for s in SIDES if any(s in rows for rows in results["tuners"].values())]
    width = 0.8 / len(sides)
    for key, title, name in (
        ("step_vs_base", "training step time ÷ frozen base's forward+backward", "step_ratio"),
        ("peak_mib", "peak memory of one training step (MiB, allocator)", "memory"),
    ):
        fig, ax = plt.subplots(figsize=(11, 4.5))
        for i, side in enumerate(sides):
            xs = [t for t, rows in enumerate(results["tuners"].values()) if side in rows]
            values = [results["tuners"][tuners[x]][side][key] for x in xs]
            ax.bar([x + (i - (len(sides) - 1) / 2) * width for x in xs], values, width, label=SIDES[side])
        if key == "peak_mib":
            bases = [rows["base"]["peak_mib"] for rows in results["tuners"].values()]
            ax.scatter(range(len(tuners)), bases, marker="_", s=400, color="black", label="frozen base", zorder=3)
        else:
            ax.axhline(1.0, color="black", linewidth=0.8)
        labels = [f"{t}\n({results['tuner_notes'][t]['family']})" for t in tuners]
        ax.set_xticks(range(len(tuners)), labels, fontsize=8)
        ax.set_title(title)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = folder / f"suite{suffix}_{name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    if results.get("scaling"):
        fig, axes = plt.subplots(2, 2, figsize=(11, 7))
        for col, axis in enumerate(("sequence", "width")):
            for tuner, curves in results["scaling"].items():
                points = curves[axis]
                xs = [p["x"] for p in points]
                axes[0][col].plot(xs, [1000 * p["step_s"] for p in points], marker="o", label=tuner)
                axes[1][col].plot(xs, [p["peak_mib"] for p in points], marker="o", label=tuner)
            label = "sequence length (ViT: patch tokens)" if axis == "sequence" else "model width"
            for row, ylabel in enumerate(("step (ms)", "peak step MiB")):
                axes[row][col].set_xscale("log", base=2)
                axes[row][col].set_yscale("log")
                # plain numbers on minor ticks too: most curves span less than a decade
                axes[row][col].yaxis.set_major_formatter(FormatStrFormatter("%g"))
                axes[row][col].yaxis.set_minor_formatter(FormatStrFormatter("%g"))
                axes[row][col].set_xlabel(label)
                axes[row][col].set_ylabel(ylabel)
                axes[row][col].legend(fontsize=8)
        fig.suptitle("cost growth (log-log; Llama for LoRA/Adapter, ViT for Res-Tuning)")
        fig.tight_layout()
        path = folder / f"suite{suffix}_scaling.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
