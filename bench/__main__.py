"""``python -m bench``: the issue-7 benchmarks, one after another, and whether each target is met.

Each benchmark runs in a process of its own (a fresh interpreter: nothing one leaves
behind, threads or memory, is counted by the next) and prints its results as it
always does; this command ends with every ``[… target …: met]`` (or ``MISSED``)
verdict gathered in one list.
Exit status 0 when every target was met, 1 when one was missed or a benchmark failed.

Usage: .venv/bin/python -m bench [quorum] [detection] [footprint]
                                 [--repeat N] [--window S]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from bench.common import load_average

HERE = Path(__file__).resolve().parent
VERDICT = re.compile(r"\[[^\]]*target[^\]]*: (met|MISSED)\]")
"""How every benchmark prints a verdict: ``[target …: met]``, ``[p99 target …: MISSED]``."""
BUSY = 2.0
"""A 1-minute load average above this on 2 cores means other jobs skew the numbers."""


def commands(repeat: int, window: float) -> dict[str, list[str]]:
    """The command line of each benchmark, by name, in the order they run."""
    return {
        "quorum": [sys.executable, str(HERE / "quorum.py")],
        "detection": [sys.executable, "-m", "bench.detection", "--repeat", str(repeat)],
        "footprint": [sys.executable, "-m", "bench.footprint", "--window", f"{window:g}"],
    }


def run(name: str, argv: list[str]) -> tuple[int, list[str]]:
    """Run one benchmark, echoing its output; its exit code and its verdict lines."""
    print(f"==> {name}: {' '.join(argv[1:])} ({load_average()})", flush=True)
    started = time.monotonic()
    verdicts = []
    with subprocess.Popen(argv, cwd=HERE.parent, stdout=subprocess.PIPE, text=True) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            print(line, end="", flush=True)
            if VERDICT.search(line):
                verdicts.append(line.rstrip())
    print(f"<== {name}: exit {proc.returncode} after {time.monotonic() - started:.0f}s",
          flush=True)
    return proc.returncode, verdicts


def main(argv: Sequence[str] | None = None) -> int:
    """Run the chosen benchmarks (all by default) and print the verdicts together."""
    names = list(commands(0, 0))
    parser = argparse.ArgumentParser(prog="python -m bench",
                                     description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("only", nargs="*", metavar="BENCHMARK",
                        help=f"run only these ({', '.join(names)}; default: all)")
    parser.add_argument("--repeat", type=int, default=10, metavar="N",
                        help="node failures timed by the detection benchmark (default 10)")
    parser.add_argument("--window", type=float, default=180.0, metavar="S",
                        help="idle seconds sampled per case by the footprint benchmark "
                             "(default 180)")
    args = parser.parse_args(argv)
    if unknown := set(args.only) - set(names):
        parser.error(f"no benchmark {', '.join(sorted(unknown))}: choose from {', '.join(names)}")
    one_minute = os.getloadavg()[0]
    if one_minute > BUSY:
        print(f"warning: {load_average()}: other jobs will skew the timings", flush=True)
    failed, verdicts = [], []
    for name, command in commands(args.repeat, args.window).items():
        if args.only and name not in args.only:
            continue
        code, lines = run(name, command)
        verdicts += [f"{name}: {line}" for line in lines]
        if code != 0:
            failed.append(f"{name} (exit {code})")
    print("\nTargets:")
    print("\n".join(f"  {line}" for line in verdicts))
    missed = sum("MISSED" in line for line in verdicts)
    print(f"{len(verdicts) - missed} met, {missed} missed"
          + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if missed or failed else 0


if __name__ == "__main__":
    sys.exit(main())
