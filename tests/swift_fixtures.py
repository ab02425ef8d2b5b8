"""Loading the ms-swift fixtures in ``tests/fixtures/swift`` (made by its ``make_fixtures.py``)."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

FIXTURES = Path(__file__).parent / "fixtures" / "swift"


def load_case(name: str) -> tuple[dict, torch.nn.Module, dict[str, torch.Tensor]]:
    """A fixture's description, its base model (from its saved weights) and its recorded inputs/outputs."""
    folder = FIXTURES / name
    if not (folder / "case.json").is_file():
        pytest.skip(f"ms-swift fixture {name} is missing")
    case = json.loads((folder / "case.json").read_text())
    module_name, _, class_name = case["model_class"].rpartition(".")
    model_cls = getattr(importlib.import_module(module_name), class_name)
    base_dir = folder / case.get("base_dir", "base")
    kwargs = dict(case.get("model_init_kwargs", {}))
    if case.get("attn_implementation"):
        kwargs["attn_implementation"] = case["attn_implementation"]
    # diffusers still names the dtype argument torch_dtype
    dtype_arg = "torch_dtype" if module_name.startswith("diffusers") else "dtype"
    base = model_cls.from_pretrained(base_dir, **{dtype_arg: torch.float32}, **kwargs)
    return case, base.eval(), load_file(str(folder / "io.safetensors"))


def run_case(case: dict, model: torch.nn.Module, io: dict[str, torch.Tensor]):
    """Call ``model`` on the fixture's inputs, as ms-swift did."""
    inputs = {name: io[spec["io_key"]] for name, spec in case["inputs"].items()}
    with torch.no_grad():
        return model(**inputs, **case.get("call_kwargs", {}))
