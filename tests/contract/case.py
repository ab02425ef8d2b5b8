"""What the contract suite needs to know about one tuner: a tiny model, inputs and a config."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from peft import PeftConfig
from torch import nn

from ..tiny_models import main_output


@dataclass
class ContractCase:
    """One tuner on one tiny model.

    Args:
        id: test id, e.g. ``"adapter-bert"``.
        make_model: returns a fresh seeded model in eval mode (same weights on every call).
        make_inputs: returns the keyword inputs of one forward.
        make_config: returns a fresh config of the tuner.
        mergeable: whether ``merge_and_unload`` must work (else it must raise a clear error).
        output: picks the compared tensor from the model output.
        half_precision: whether fp16/bf16 forward is checked.
        one_trainable_adapter: the tuner trains one adapter at a time (AdaLoRA), so extra adapters are
            added with ``inference_mode=True``.
        known_defects: contract test name -> reason, for failures that are PEFT's own (e.g. in one peft
            version); those tests are strict expected failures, so a fix upstream shows up.
        changes_eval_outputs: False for tuners that act only in training mode (NEFTune's noise): the checks
            that an adapter changes eval-mode outputs do not apply to them.
        not_applicable: contract test name -> why the check cannot hold for this tuner by design, e.g. getting
            the base outputs back after an in-place tuner (LISA) changed the base weights themselves. Those
            tests are skipped with the reason (not expected to fail): nothing is wrong and nothing will change.
            A defect belongs in ``known_defects``; ``tests/contract/test_cases_cover_every_tuner.py`` checks
            that every name here is a contract test.
    """

    id: str
    make_model: Callable[[], nn.Module]
    make_inputs: Callable[[], dict]
    make_config: Callable[[], PeftConfig]
    mergeable: bool = False
    output: Callable[[object], torch.Tensor] = main_output
    half_precision: bool = True
    one_trainable_adapter: bool = False
    changes_eval_outputs: bool = True
    known_defects: dict[str, str] = field(default_factory=dict)
    not_applicable: dict[str, str] = field(default_factory=dict)

    def make_extra_config(self) -> PeftConfig:
        """A config for a second adapter of the same type."""
        config = self.make_config()
        config.inference_mode = self.one_trainable_adapter
        return config
