"""What the issue-7 benchmarks share: how a target is judged and printed, the machine.

Every benchmark prints its verdicts as ``<what>: <value> [target <target>: met]`` (or
``MISSED``), as ``bench/quorum.py`` does, so that ``python -m bench`` can gather them
from all of them into one summary.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from bench.quorum import machine, percentile

REPO = Path(__file__).resolve().parent.parent
"""The checkout the benchmarks run from (its personas, policies and docs)."""

__all__ = ["Check", "load_average", "machine_lines", "percentile", "spread", "work_directory"]


@dataclass(frozen=True)
class Check:
    """One measured value against its target."""

    what: str
    value: str
    target: str
    met: bool

    def line(self) -> str:
        return f"{self.what}: {self.value} [target {self.target}: " \
               f"{'met' if self.met else 'MISSED'}]"


def spread(values: Sequence[float], unit: str = "s", digits: int = 2) -> str:
    """``p50 … , max …`` of repeated measurements (nearest rank: measured values)."""
    if not values:
        return "no values"
    ordered = sorted(values)
    return (f"p50 {percentile(ordered, 0.5):.{digits}f} {unit}, "
            f"max {ordered[-1]:.{digits}f} {unit} (n={len(ordered)})")


def load_average() -> str:
    """The 1-, 5- and 15-minute load averages: other jobs share the machine."""
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} {five:.2f} {fifteen:.2f} on {os.cpu_count()} CPUs"


def machine_lines() -> list[str]:
    """The machine (as ``bench/quorum.py`` prints it) and its load now."""
    return [*machine(), load_average()]


def work_directory(stack: ExitStack, given: Path | None, prefix: str) -> Path:
    """``given`` (created; it must not exist yet, so nothing is overwritten), or a
    temporary directory removed when ``stack`` closes."""
    if given is None:
        return Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=prefix)))
    given.mkdir(parents=True)
    return given
