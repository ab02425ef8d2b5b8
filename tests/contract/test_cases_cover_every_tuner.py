"""Every registered tuner has a contract case, and the cases' per-check notes name real contract checks."""

from __future__ import annotations

import pytest
from peft.utils import PeftType

from peft_swift_ext import TUNERS

from . import test_contract
from .cases import ALL_CASES

CONTRACT_CHECKS = {name for name in vars(test_contract) if name.startswith("test_")}


def tuner_of(case) -> str | None:
    """The registered tuner whose config the case uses (None for PEFT's own methods)."""
    peft_type = PeftType(case.make_config().peft_type)
    return next((name for name, spec in TUNERS.items() if spec.peft_type == peft_type), None)


def test_every_registered_tuner_has_a_contract_case():
    covered = {tuner_of(case) for case in ALL_CASES}
    missing = sorted(set(TUNERS) - covered)
    assert not missing, f"registered tuners without a case in tests/contract/cases/: {missing}"


@pytest.mark.parametrize("case", ALL_CASES, ids=[case.id for case in ALL_CASES])
def test_skips_and_expected_failures_name_contract_checks(case):
    named = set(case.not_applicable) | set(case.known_defects)
    unknown = sorted(named - CONTRACT_CHECKS)
    assert not unknown, f"{case.id} names checks that tests/contract/test_contract.py does not have: {unknown}"
    both = sorted(set(case.not_applicable) & set(case.known_defects))
    assert not both, f"{case.id} marks {both} both not applicable and a known defect"


def test_a_tuner_without_a_case_is_reported(monkeypatch):
    # the check above must fail for a tuner that has no case: register a stand-in name and look
    monkeypatch.setitem(TUNERS, "no-such-tuner", TUNERS["adapter"])
    with pytest.raises(AssertionError, match="no-such-tuner"):
        test_every_registered_tuner_has_a_contract_case()
