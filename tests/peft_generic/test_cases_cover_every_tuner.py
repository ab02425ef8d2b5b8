"""Every registered tuner runs through the generic checks."""

from peft_swift_ext import TUNERS

from .cases import CASES


def test_every_registered_tuner_has_a_generic_case():
    missing = sorted(set(TUNERS) - {case.tuner for case in CASES})
    assert not missing, f"tuners without a case in tests/peft_generic/cases.py: {missing}"


def test_every_case_names_a_registered_tuner():
    unknown = sorted({case.tuner for case in CASES} - set(TUNERS))
    assert not unknown, f"cases for tuners that are not registered: {unknown}"
