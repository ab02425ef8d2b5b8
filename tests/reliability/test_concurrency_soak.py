"""The concurrency soak at CI size (``benchmarks/soak.py`` runs it at 8 threads x 500 forwards).

See ``soak_engine`` for what runs concurrently and why that combination is the supported one.
"""

from __future__ import annotations

import pytest

from .soak_engine import run_soak

THREADS = 8
FORWARDS = 20


@pytest.fixture(scope="module")
def soak():
    return run_soak(threads=THREADS, forwards=FORWARDS)


def test_soak_runs_without_errors(soak):
    assert soak.errors == []
    assert soak.forwards == THREADS * FORWARDS


def test_soak_outputs_all_equal_single_thread_references(soak):
    assert soak.mismatches == []


def test_soak_offloads_really_happened_during_forwards(soak):
    # otherwise the offload half of the soak proved nothing
    assert soak.offloads > 0 and soak.shared_forwards > 0


def test_soak_resident_memory_returns_within_5_percent(soak):
    assert abs(soak.rss_growth) <= 0.05, f"RSS {soak.rss_before / 2**20:.0f} -> {soak.rss_after / 2**20:.0f} MiB"
