"""Per-check notes of the generic suite: checks that do not apply to a case are skipped with their reason
(``GenericCase.not_applicable``), and failures that are PEFT's own in older releases are strict expected failures
there (so a check that starts passing shows up)."""

import pytest
from packaging.version import Version
from peft import __version__ as peft_version

LORA_FAMILY = {"longlora", "loraplus"}  # this package's tuners that are PEFT's LoRA layers underneath


def _lora_family(case) -> bool:
    return case.tuner in LORA_FAMILY


def _saves_weights(case) -> bool:
    return not case.weightless


#: check -> (first peft release without the defect, the cases it shows in, what PEFT does before that release)
PEFT_DEFECTS = {
    "test_selected_adapter_is_saved_alone_despite_similar_names": (
        "0.20",
        _saves_weights,
        "save_pretrained(selected_adapters=['default']) also writes adapters whose names contain 'default'",
    ),
    "test_deleting_an_adapter_leaves_nothing_of_it": (
        "0.20",
        _lora_family,
        "LoRA layers keep the deleted adapter's use_dora / lora_bias entries",
    ),
    "test_deleting_the_last_adapter_leaves_nothing_of_it": (
        "0.20",
        _lora_family,
        "LoRA layers keep the deleted adapter's use_dora / lora_bias entries",
    ),
}


@pytest.fixture(autouse=True)
def _notes_of_the_case(request):
    callspec = getattr(request.node, "callspec", None)
    case = callspec.params.get("case") if callspec is not None else None
    if case is None:
        return
    check = request.node.originalname
    reason = case.not_applicable.get(check)
    if reason:
        pytest.skip(f"{case.id}: {reason}")
    fixed_in, shows_in, what = PEFT_DEFECTS.get(check, (None, None, None))
    if fixed_in and Version(peft_version) < Version(fixed_in) and shows_in(case):
        request.applymarker(pytest.mark.xfail(strict=True, reason=f"peft < {fixed_in}: {what}"))
