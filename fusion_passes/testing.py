"""Helpers for users' CI: assert how many matches each pass made."""

from __future__ import annotations

from .config import PASS_NAMES
from .report import Report


def count_mismatches(report: Report, expected: dict[str, int]) -> list[str]:
    """Readable lines for every pass whose count differs from ``expected`` (passes not
    named in ``expected`` are not checked)."""
    unknown = sorted(set(expected) - set(PASS_NAMES))
    if unknown:
        raise ValueError(f"unknown pass names {unknown}; passes are {list(PASS_NAMES)}")
    counts = report.counts
    return [
        f"  {name}: expected {want}, got {counts[name]}"
        for name, want in expected.items()
        if counts[name] != want
    ]


def assert_matches(report: Report, **expected: int) -> None:
    """``assert_matches(backend.report, router_gemm=4, nan_safe_routing=4)``; fails with
    a diff of the counts and the per-graph table."""
    mismatches = count_mismatches(report, expected)
    if mismatches:
        raise AssertionError(
            "fusion_passes match counts differ:\n" + "\n".join(mismatches) + "\n\nper graph:\n" + report.table()
        )
