"""``zeta-lab`` (``make lab``): five agents repair a real control plane, every step shown.

The checkout is an argument (``--config-dir``, default the working directory), never
found from where this module is installed.
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Sequence
from pathlib import Path

from lab import drill
from runtime.ops.common import UserError, dispatch, load_config_dir


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="zeta-lab",
        description="Start nats-server, etcd + kube-apiserver + kube-controller-manager (built "
                    "into the cache the first time), a simulated cluster of 9 nodes and the "
                    "personas as processes, then run a drill: a dead kubelet, a crash loop, "
                    "an API server outage, the breaker, a forged vote. Ends with a summary "
                    "and `zeta-agent audit verify`; exit 0 if every step passed, 1 if one "
                    "failed, 2 if the lab could not start, 130 on Ctrl-C. Nothing is left "
                    "running.")
    parser.add_argument("--config-dir", type=Path, default=Path(), metavar="DIR",
                        help="the checkout whose personas and policies to copy (default: .)")
    parser.add_argument("--keep", action="store_true",
                        help="after the drill, leave everything up and print the commands "
                             "to explore it, until Ctrl-C")
    parser.add_argument("--steps", default="all", metavar="LIST",
                        help="'all' (default), 'none', or some of kubelet, crashloop, "
                             "apiserver, breaker, forged, comma-separated")
    return parser


def _run(args: argparse.Namespace) -> int:
    try:
        steps = drill.parse_steps(args.steps)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    load_config_dir(args.config_dir)  # a broken configuration starts nothing
    options = drill.LabOptions(args.config_dir, keep=args.keep, steps=steps)
    return asyncio.run(drill.run_lab(options))


def main(argv: Sequence[str] | None = None) -> int:
    """The console script; user mistakes become a message and exit code 2."""
    return dispatch("zeta-lab", _run, build_parser().parse_args(argv))
