"""Every config field of every tuner, with hostile values, through ``Swift.from_pretrained``.

A checkpoint's ``adapter_config.json`` comes from wherever the checkpoint came from. For each tuner, one field at
a time is given a hostile value (NaN, infinities, zero, negatives, huge numbers, wrong types, ...). The load must
either raise the documented ``ValueError`` naming the config file, or succeed; and a model it accepted must train
sanely for one step: finite outputs, finite gradients, some gradient that is not zero, and finite learning rates
in its optimizer groups (an error during that step is loud, and allowed). Anything else — another exception from
the load, or a value accepted that silently breaks training — fails.

The first test tries every (field, value) pair of a fixed list through the config reader alone (cheap); the second
lets hypothesis draw fields and values, including generated ones, through the full load and a training step.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from peft_swift_ext import LisaConfig, Swift
from peft_swift_ext.conversion import config_from_dict

from ..contract.case import ContractCase
from ..contract.cases import ALL_CASES
from ..helpers import randomize_adapter
from ..tiny_models import llama_inputs, tiny_llama

CASES = {case.id: case for case in ALL_CASES}
CASES["lisa-llama"] = ContractCase(
    "lisa-llama", tiny_llama, llama_inputs, lambda: LisaConfig(n_layers=1, interval=2, seed=3)
)
#: one case per config class of this package, and PEFT's LoRA (this package's loader reads its configs too)
FUZZED = {
    "lora-llama": 40,
    "loraplus-llama": 25,
    "longlora-llama": 25,
    "adapter-llama": 25,
    "prompt-llama": 25,
    "side-bert": 25,
    "llamapro-llama": 25,
    "neftune-llama": 15,
    "restuning-vit": 25,
    "lisa-llama": 25,
    "scedit-unet": 4,  # seconds per UNet forward on a CPU
}
#: bookkeeping fields, not the tuner's: the loader sets or ignores them
SKIPPED = {"peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode", "auto_mapping"}
HOSTILE = [
    float("nan"),
    float("inf"),
    float("-inf"),
    -1,
    0,
    0.999,
    1.0,
    65505,
    2**63,
    10**30,
    -0.5,
    1e308,
    True,
    None,
    "",
    "zz",
    [],
    [None],
    [-1],
    {},
    {"a": float("nan")},
    {"megatron.core": 1},
]
FUZZ = settings(
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """One saved adapter ``a`` per fuzzed case (its folder), built lazily."""
    root = tmp_path_factory.mktemp("fuzz")
    return {"root": root}


def folder_of(checkpoints: dict, case_id: str) -> Path:
    if case_id not in checkpoints:
        case = CASES[case_id]
        model = Swift.prepare_model(case.make_model(), {"a": case.make_config()})
        randomize_adapter(model, "a", seed=0)
        model.save_pretrained(checkpoints["root"] / case_id)
        checkpoints[case_id] = checkpoints["root"] / case_id / "a"
    return checkpoints[case_id]


def fields_of(folder: Path) -> list[str]:
    return sorted(set(json.loads((folder / "adapter_config.json").read_text())) - SKIPPED)


def with_field(folder: Path, field: str, value) -> dict:
    config = json.loads((folder / "adapter_config.json").read_text())
    return {**config, field: value}


def assert_refusal_names_the_file(error: ValueError, config_file: Path) -> None:
    assert str(config_file) in str(error) or str(config_file.parent) in str(error), f"file not named: {error}"


@pytest.mark.parametrize("case_id", list(FUZZED))
def test_every_field_with_every_hostile_value_is_refused_naming_the_file_or_read(case_id, checkpoints):
    folder = folder_of(checkpoints, case_id)
    config_file = folder / "adapter_config.json"
    for field in fields_of(folder):
        for value in HOSTILE:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    config_from_dict(with_field(folder, field, value), config_file)
            except ValueError as error:
                assert_refusal_names_the_file(error, config_file)
            except Exception as error:  # noqa: BLE001 - any other type breaks the documented contract
                pytest.fail(f"{field}={value!r}: {type(error).__name__}: {error}")


def values_like(original):
    """Hostile values of any type, and values of the field's own type (which pass type checks and reach the model)."""
    own = {
        bool: st.booleans(),
        int: st.one_of(st.integers(-(2**70), 2**70), st.sampled_from([0, -1, 1, 2**31, 2**63])),
        float: st.floats(allow_nan=True, allow_infinity=True),
        str: st.text(max_size=6),
        list: st.lists(st.one_of(st.integers(-3, 3), st.text(max_size=3)), max_size=3),
        dict: st.dictionaries(st.text(max_size=4), st.one_of(st.integers(-3, 3), st.floats()), max_size=2),
    }
    mine = own.get(type(original), st.none())
    if isinstance(original, (int, float)) and not isinstance(original, bool):
        # ints in JSON are often read into float fields; scaled originals keep the adapter's shapes
        scaled = st.sampled_from([original * k for k in (0, -1, 1e-9, 1e9, 0.5, 2)])
        mine = st.one_of(mine, own[float], scaled, scaled)
    return st.one_of(mine, mine, st.sampled_from(HOSTILE))


def train_step_problem(model, case: ContractCase) -> str | None:
    """What is wrong with one training step of an accepted model, or None (an exception is loud: allowed)."""
    model.train()
    try:
        output = case.output(model(**case.make_inputs())).float()
        params = [p for p in model.parameters() if p.requires_grad]
        if params:
            output.pow(2).mean().backward()
        groups = model.create_optimizer_param_groups(lr=1e-3)
    except Exception:  # noqa: BLE001 - a loud failure is not a silent one
        return None
    if not torch.isfinite(output).all():
        return "non-finite output"
    if any(p.grad is not None and not torch.isfinite(p.grad).all() for p in params):
        return "non-finite gradients"
    if params and not any(p.grad is not None and p.grad.abs().sum() > 0 for p in params):
        return "no parameter gets a gradient: the adapter would never train"
    if any(not math.isfinite(group.get("lr", 1e-3)) for group in groups):
        return "a non-finite learning rate"
    return None


@pytest.mark.parametrize("case_id", list(FUZZED))
def test_hostile_fields_are_refused_naming_the_file_or_train_sanely(case_id, checkpoints):
    folder = folder_of(checkpoints, case_id)
    config_file = folder / "adapter_config.json"
    original = config_file.read_text()
    case = CASES[case_id]

    original_config = json.loads(original)

    @settings(FUZZ, max_examples=FUZZED[case_id])
    @given(data=st.data())
    def one(data):
        field = data.draw(st.sampled_from(fields_of(folder)), label="field")
        value = data.draw(values_like(original_config[field]), label="value")
        config_file.write_text(json.dumps(with_field(folder, field, value)))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = Swift.from_pretrained(case.make_model(), folder.parent, is_trainable=True)
        except ValueError as error:
            assert_refusal_names_the_file(error, config_file)
            return
        except Exception as error:  # noqa: BLE001
            pytest.fail(f"{field}={value!r}: {type(error).__name__} from the load: {error}")
        problem = train_step_problem(model, case)
        assert problem is None, f"{field}={value!r} accepted, but {problem}"

    try:
        one()
    finally:
        config_file.write_text(original)
