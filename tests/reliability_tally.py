"""Counts what the reliability tests try (fuzz cases, bad inputs, faults injected) and
prints the totals at the end of the run, for the README's reliability section.

A test calls ``tally("bad inputs")`` once per case it tries. UNLEARN_EXT_TALLY_FILE=<path>
also writes the totals there as JSON.
"""
from __future__ import annotations

import json
import os
from collections import Counter

COUNTS: Counter = Counter()


def tally(kind: str, n: int = 1) -> None:
    COUNTS[kind] += n


def pytest_terminal_summary(terminalreporter):
    if not COUNTS:
        return
    terminalreporter.write_line("reliability: " + ", ".join(f"{n} {kind}" for kind, n in sorted(COUNTS.items())))
    path = os.environ.get("UNLEARN_EXT_TALLY_FILE")
    if path:
        with open(path, "w") as f:
            json.dump(dict(COUNTS), f, indent=1, sort_keys=True)
