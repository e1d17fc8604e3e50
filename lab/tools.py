"""Developer tooling: the pinned ``nats`` CLI, and the generated parts of the bus docs.

``python -m lab.tools nats`` builds the real NATS command-line tool from the Go
module proxy into a per-machine cache (``${ZETA_CACHE_DIR:-~/.cache/zeta-agent}``)
and prints its path; the tests that show ``nats sub 'zeta.>'`` works use the same
build. ``python -m lab.tools docs`` regenerates docs/schemas/*.json and the
example messages in docs/bus.md; ``--check`` says whether they are current (a test
runs the same check, so the docs cannot drift from the code).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import nkeys
from pydantic import BaseModel

from bus import ids
from bus.connection import subject_for
from bus.envelope import Envelope, seal
from bus.keys import Signer
from bus.leases import kv_key
from bus.messages import (
    BODIES,
    Control,
    Decision,
    EvidenceRule,
    Finding,
    Heartbeat,
    Kind,
    Proposal,
    QuorumRule,
    Required,
    Result,
    Started,
    Target,
    Vote,
)
from bus.quorum import Ballot, Rule, tally
from runtime.core import review
from runtime.core.detecting import JSON
from runtime.model.formats import Safety
from runtime.model.snapshot import NodeCondition, NodeObs

CACHE_ENV = "ZETA_CACHE_DIR"
BUILD_TIMEOUT = 15 * 60.0

Progress = Callable[[str], None]


# ---------------------------------------------------------------- Go tools


class ToolUnavailableError(RuntimeError):
    """A tool could not be provided (Go missing, the build failed); the message says why."""


@dataclass(frozen=True)
class GoTool:
    """A Go program installed with ``go install <package>@<version>``."""

    name: str
    package: str
    version: str
    binary: str

    def path(self, cache: Path) -> Path:
        """Where the binary lives in the cache: one directory per version, never overwritten."""
        return cache / self.name / self.version / self.binary


NATSCLI = GoTool("natscli", "github.com/nats-io/natscli/nats", "v0.5.0", "nats")
"""Pinned: tests/test_natscli.py parses the output format of this exact version."""
ALERTMANAGER = GoTool("alertmanager", "github.com/prometheus/alertmanager/cmd/alertmanager",
                      "v0.28.1", "alertmanager")
"""The router SREs already run; the agents post to its API v2 (runtime/agent/alerting.py).
v0.28.1: v0.35.0, the newest served, embeds a UI build (ui/app/dist) that its module zip
lacks, so `go install` fails on it."""


def cache_dir(environ: Mapping[str, str] = os.environ) -> Path:
    """``$ZETA_CACHE_DIR``, else ``~/.cache/zeta-agent``: outside the repository, per machine."""
    given = environ.get(CACHE_ENV)
    return Path(given) if given else Path(environ.get("HOME", Path.home())) / ".cache/zeta-agent"


def stderr_progress(line: str) -> None:
    """The default ``Progress``: one line on stderr, at once (stdout is for results)."""
    print(line, file=sys.stderr, flush=True)


@contextlib.contextmanager
def build_lock(path: Path, progress: Progress) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created if needed), saying so if we must wait.

    Parallel test workers and the lab build into the same cache: one builds, the rest wait.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:  # the lock is released when the file is closed
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            progress(f"waiting for another process building into {path.parent}")
            fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def cached(path: Path, build: Callable[[Path], None], progress: Progress = stderr_progress) -> Path:
    """``path``, made by ``build(scratch)`` the first time, once per machine.

    Under the lock of its directory (``.lock``: parallel callers wait for one build;
    ``build`` must not itself wait for that lock), into a temporary sibling that is
    renamed into place only when complete: a killed build leaves nothing that a later
    run would trust.
    """
    if path.exists():
        return path
    with build_lock(path.parent / ".lock", progress):
        if path.exists():  # built by whoever held the lock before us
            return path
        with tempfile.TemporaryDirectory(dir=path.parent, prefix=".build-") as scratch:
            target = Path(scratch) / path.name
            build(target)
            target.replace(path)
    return path


def ensure_built(tool: GoTool, *, environ: Mapping[str, str] = os.environ,
                 progress: Progress = stderr_progress) -> Path:
    """The tool's binary, built once per machine (a lock keeps parallel callers to one build).

    Raises ToolUnavailableError if ``go`` is not on ``PATH`` or the build fails.
    """
    path = tool.path(cache_dir(environ))
    return cached(path, lambda target: _build(tool, target, path, environ, progress), progress)


def find_go(environ: Mapping[str, str], building: str) -> str:
    """The ``go`` on ``PATH``; ToolUnavailableError naming what it was ``building`` if none."""
    go = shutil.which("go", path=environ.get("PATH", ""))
    if go is None:
        raise ToolUnavailableError(f"`go` is not on PATH: it is needed once to build {building}")
    return go


def _build(tool: GoTool, target: Path, path: Path, environ: Mapping[str, str],
           progress: Progress) -> None:
    """``go install`` the tool as ``target`` (in ``cached``'s scratch directory, with the
    binary's own name, so nothing needs moving), on its way to ``path``."""
    go = find_go(environ, f"{tool.binary} {tool.version} ({tool.package}) into {path.parent}")
    progress(f"building {tool.package}@{tool.version} with {go} into {path.parent} "
             f"(once per machine; about a minute)")
    started = time.monotonic()
    scratch = target.parent
    env = {**environ, "GOBIN": str(scratch), "GOFLAGS": "-mod=mod",
           # A static binary: the build must not depend on a C toolchain being installed.
           "CGO_ENABLED": "0"}
    try:
        with subprocess.Popen([go, "install", f"{tool.package}@{tool.version}"],
                              cwd=scratch, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) as proc:
            assert proc.stdout is not None
            tail: list[str] = []
            for line in proc.stdout:
                progress(f"  {line.rstrip()}")
                tail = [*tail[-19:], line.rstrip()]
            code = proc.wait(timeout=BUILD_TIMEOUT)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ToolUnavailableError(f"go install {tool.package}@{tool.version}: {exc}") from exc
    if code != 0 or not target.exists():
        raise ToolUnavailableError(
            f"go install {tool.package}@{tool.version} failed (exit {code}): "
            + " | ".join(tail[-5:]))
    progress(f"built {path} in {time.monotonic() - started:.0f}s")


def natscli(environ: Mapping[str, str] = os.environ, progress: Progress = stderr_progress) -> Path:
    """The pinned ``nats`` CLI, built on first use."""
    return ensure_built(NATSCLI, environ=environ, progress=progress)


def alertmanager(environ: Mapping[str, str] = os.environ,
                 progress: Progress = stderr_progress) -> Path:
    """The pinned Alertmanager, built on first use."""
    return ensure_built(ALERTMANAGER, environ=environ, progress=progress)


# ---------------------------------------------------------------- example messages

EXAMPLE_START = datetime(2026, 11, 27, 6, 0, tzinfo=UTC)
EXAMPLE_VOTERS = frozenset({"otto", "alexa", "riven", "vera", "lior"})
EXAMPLE_OPERATOR = "oncall"
EXAMPLE_SENDERS = ("otto", "alexa", "riven", EXAMPLE_OPERATOR)


def example_signer(name: str) -> Signer:
    """A documentation key, derived from the name: it is no real persona's or operator's key."""
    raw = hashlib.sha256(f"zeta-agent documentation example key for {name}".encode()).digest()
    seed: bytes = nkeys.encode_seed(raw, nkeys.PREFIX_BYTE_USER)
    return Signer(seed)


def _digest(label: str) -> str:
    return hashlib.sha256(label.encode()).hexdigest()


def _example_review(target: Target, at: datetime) -> list[JSON]:
    """Riven's review checks of the example cordon, run by ``runtime.core.review`` on a
    small cluster (three control-plane nodes, worker-1 NotReady, worker-2 Ready), so the
    documented evidence is the real shape."""
    ready = (NodeCondition(type="Ready", status="True"),)
    nodes = (*(NodeObs(name=f"cp-{i}", labels={review.CONTROL_PLANE_LABELS[0]: ""},
                       conditions=ready) for i in (1, 2, 3)),
             NodeObs(name="worker-1", conditions=(NodeCondition(type="Ready", status="Unknown"),)),
             NodeObs(name="worker-2", conditions=ready))
    disruption = review.disruption("k8s.node.cordon", target)
    assert disruption is not None
    checks = review.review(review.Facts(disruption=disruption, nodes=nodes, pods=(), leases=(),
                                        safety=Safety(), outage=None, now=at))
    return [c.evidence() for c in checks]


def story(signers: Mapping[str, Signer], *, start: datetime, host: str = "cp-1",
          voters: frozenset[str] = EXAMPLE_VOTERS,
          new_id: Callable[[datetime], str] | None = None) -> list[tuple[str, Envelope]]:
    """One repair as the bus carries it, with a message of every kind, in order.

    Otto sees worker-1 NotReady, proposes a cordon, Alexa and Riven approve, Otto
    decides (the tally of ``voters``), takes the lease, cordons and reports; then an
    operator freezes the fleet. ``signers`` holds otto, alexa, riven and ``oncall``
    (the operator). Times run a few seconds from ``start``; ``new_id`` makes message
    ids (default: fresh ULIDs).
    """
    make_id = new_id or (lambda at: ids.new_id(int(at.timestamp() * 1000)))
    repair = make_id(start + timedelta(seconds=1))
    target = Target(kind="node", name="worker-1")
    deadline = start + timedelta(seconds=31)
    out: list[tuple[str, Envelope]] = []

    def say(kind: Kind, sender: str, offset: float, body: Any, *, about: bool = True) -> Envelope:
        at = start + timedelta(seconds=offset)
        envelope = seal(kind, sender=sender, host=host, body=body, signer=signers[sender],
                        repair=repair if about else None, at=at, message_id=make_id(at))
        out.append((subject_for(envelope), envelope))
        return envelope

    policy_digest = _digest("policy node-not-ready")
    two_paths = EvidenceRule(distinct=2)
    say("heartbeat", "otto", 0, Heartbeat(
        pid=4242, version="0.1.0", tick=12, status="ok: 1 finding open", bus="connected",
        kubernetes="observed", scopes_digest=_digest("otto scopes"),
        policies_digest=_digest("otto policies")), about=False)
    say("finding", "otto", 0.2, Finding(
        state="opened", policy="node-not-ready", target=target,
        since=start - timedelta(minutes=3), summary="node worker-1 Ready=Unknown for 3m",
        evidence={"condition": "Ready", "status": "Unknown", "reason": "NodeStatusUnknown"}),
        about=False)
    say("proposal", "otto", 1, Proposal(
        action="k8s.node.cordon", target=target, policy="node-not-ready",
        policy_digest=policy_digest, step=0, destructive=True,
        quorum=QuorumRule(approvals=3, veto=("riven",), deadline=deadline, evidence=two_paths),
        summary="node worker-1 Ready=Unknown for 3m",
        evidence={"since": "2026-11-27T05:57:00Z", "reason": "NodeStatusUnknown"},
        rationale="not Ready for 3m, longer than the policy's 2m", paths=("apiserver",)))
    # What the voters' own copy of the policy demands, recorded in each vote.
    required = Required(approvals=3, veto=("riven",), deadline=30, destructive=True,
                        evidence=two_paths)
    unheard = {"host": "no agent heard from on worker-1"}
    votes = [
        say("vote", "alexa", 1.4, Vote(
            verdict="approve", reason="confirmed from cp-2: node worker-1 Ready=Unknown for 3m",
            evidence={"host": "cp-2", "held_for_s": 180.0, "paths": {
                "network": "kubelet port 10.0.0.21:10250: Connection refused"},
                "unconfirmed": unheard},
            observed_at=start + timedelta(seconds=1.3), policy_digest=policy_digest,
            required=required, paths=("apiserver", "network"))),
        say("vote", "riven", 1.6, Vote(
            verdict="approve", reason="confirmed from cp-3: node worker-1 Ready=Unknown for 3m",
            evidence={"host": "cp-3", "held_for_s": 180.0, "paths": {
                "network": "kubelet port 10.0.0.21:10250: Connection refused"},
                "unconfirmed": unheard, "checks": _example_review(target, start)},
            observed_at=start + timedelta(seconds=1.5), policy_digest=policy_digest,
            required=required, paths=("apiserver", "network"))),
    ]
    rule = Rule("otto", 3, frozenset({"riven"}), deadline, two_paths, frozenset({"apiserver"}))
    decided = tally(rule, [Ballot.of(v.id, v.sender, v.at, Vote.model_validate(v.body))
                           for v in votes], voters, start + timedelta(seconds=1.7))
    outcome = decided.outcome
    if outcome == "pending":
        raise ValueError(f"the example votes decide nothing among the voters {sorted(voters)}")
    say("decision", "otto", 1.7, Decision(
        outcome=outcome, reason=decided.reason, approvals=decided.approvals,
        rejections=decided.rejections, vetoes=decided.vetoes, votes=decided.counted))
    say("started", "otto", 1.8, Started(executor="otto", lease=kv_key(target.key),
                                        fencing_token=7))
    say("result", "otto", 2.3, Result(
        outcome="succeeded", detail="worker-1 cordoned", action="k8s.node.cordon",
        target=target, policy="node-not-ready", observed={"unschedulable": True}))
    say("control", EXAMPLE_OPERATOR, 3, Control(
        verb="freeze", reason="investigating worker-1 hardware; no repairs until thawed"),
        about=False)
    return out


def examples() -> list[tuple[str, Envelope]]:
    """The story with documentation keys and fixed times and ids: the same bytes every run."""
    signers = {name: example_signer(name) for name in EXAMPLE_SENDERS}
    counter = iter(range(1, 100))
    # Time part of a real ULID, then a counter where the random part would be, so the
    # examples are valid ids, stable between runs, and visibly made up.
    return story(signers, start=EXAMPLE_START, new_id=lambda at: (
        ids.new_id(int(at.timestamp() * 1000))[:10] + f"{next(counter):016d}"))


# ---------------------------------------------------------------- generated docs

SCHEMA_DIR = Path("docs/schemas")
BUS_DOC = Path("docs/bus.md")
_BEGIN = "<!-- begin examples: generated by `python -m lab.tools docs`; do not edit -->"
_END = "<!-- end examples -->"
_DIALECT = "https://json-schema.org/draft/2020-12/schema"


def schemas() -> dict[str, dict[str, Any]]:
    """The JSON Schema of the envelope and of each kind's body, by file stem."""
    models: dict[str, type[BaseModel]] = {"envelope": Envelope, **BODIES}
    return {name: {"$schema": _DIALECT, **model.model_json_schema(by_alias=True)}
            for name, model in models.items()}


def _json_text(value: Any) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False) + "\n"


def examples_markdown() -> str:
    """The examples section of docs/bus.md: one message of each kind, as ``nats sub`` shows it."""
    parts = [_BEGIN, ""]
    seen: set[str] = set()
    for subject, envelope in examples():
        if envelope.kind in seen:
            continue
        seen.add(envelope.kind)
        obj = json.loads(envelope.to_bytes())
        parts += [f"### {envelope.kind}", "", f"`{subject}`", "", "```json",
                  json.dumps(obj, indent=2, ensure_ascii=False), "```", ""]
    return "\n".join([*parts, _END])


def _with_examples(doc: str) -> str:
    pattern = re.compile(re.escape(_BEGIN) + ".*?" + re.escape(_END), re.DOTALL)
    if not pattern.search(doc):
        raise ValueError(f"{BUS_DOC} has no examples section ({_BEGIN!r} … {_END!r})")
    return pattern.sub(lambda _: examples_markdown(), doc)


def generated(repo: Path) -> dict[Path, str]:
    """Every generated docs file with its expected content."""
    files = {repo / SCHEMA_DIR / f"{name}.json": _json_text(schema)
             for name, schema in schemas().items()}
    files[repo / BUS_DOC] = _with_examples((repo / BUS_DOC).read_text(encoding="utf-8"))
    return files


def stale_docs(repo: Path) -> list[Path]:
    """Generated files that differ from what the code generates now (or are missing)."""
    stale = []
    for path, text in generated(repo).items():
        if not path.exists() or path.read_text(encoding="utf-8") != text:
            stale.append(path)
    stale += [p for p in sorted((repo / SCHEMA_DIR).glob("*.json"))
              if p.stem not in schemas()]
    return stale


def write_docs(repo: Path) -> list[Path]:
    """Rewrite the generated docs; return the files that changed."""
    changed = stale_docs(repo)
    expected = generated(repo)
    for path in changed:
        if path in expected:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(expected[path], encoding="utf-8")
        else:
            path.unlink()  # the schema of a kind that no longer exists
    return changed


# ---------------------------------------------------------------- command line


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m lab.tools {nats,docs}``."""
    parser = argparse.ArgumentParser(prog="python -m lab.tools", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("nats", help=f"build the pinned nats CLI ({NATSCLI.version}) if needed "
                                     "and print its path")
    docs = commands.add_parser("docs", help="regenerate docs/schemas/*.json and the examples "
                                            "in docs/bus.md")
    docs.add_argument("--checkout", type=Path, default=Path(), metavar="DIR",
                      help="the checkout whose docs to regenerate (default: .)")
    docs.add_argument("--check", action="store_true",
                      help="change nothing; exit 1 if a generated file is out of date")
    args = parser.parse_args(argv)
    if args.command == "nats":
        try:
            print(natscli())
        except ToolUnavailableError as exc:
            stderr_progress(f"error: {exc}")
            return 2
        return 0
    if not (args.checkout / BUS_DOC).is_file():
        stderr_progress(f"error: {args.checkout / BUS_DOC} not found: --checkout names the "
                        "repository whose docs to generate")
        return 2
    if args.check:
        stale = stale_docs(args.checkout)
        for path in stale:
            stderr_progress(f"out of date: {path.relative_to(args.checkout)}")
        return 1 if stale else 0
    for path in write_docs(args.checkout):
        stderr_progress(f"wrote {path.relative_to(args.checkout)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
