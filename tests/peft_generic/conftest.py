"""Skips a check, with its reason, where a case declares that it does not apply (``GenericCase.not_applicable``)."""

import pytest


@pytest.fixture(autouse=True)
def _skip_where_not_applicable(request):
    callspec = getattr(request.node, "callspec", None)
    case = callspec.params.get("case") if callspec is not None else None
    reason = case.not_applicable.get(request.node.originalname) if case is not None else None
    if reason:
        pytest.skip(f"{case.id}: {reason}")
