"""``zeta-agent watch``: a live, human-friendly view of the bus.

Every message on ``zeta.>`` is checked with the same ``Verifier`` the agents use
(keys from the persona files and the fleet's operators), so what the view shows is
what the agents believe, and what they drop is shown with the reason. One line per
message: presence changes, findings, proposals with their votes and running tally,
decisions, starts, results and operator controls; in a terminal a presence table
(last heartbeat and its age per persona) and the open proposals are printed every
``summary_every`` seconds. ``--json`` prints one JSON object per message instead.

``View`` holds what the watcher knows and renders lines; it does no I/O and takes
every time as an argument, so it is tested without a bus.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, TextIO

from pydantic import BaseModel

from bus.connection import Connection
from bus.envelope import Accepted, Dropped, Envelope, Verifier, format_time
from bus.messages import Control, Decision, Finding, Heartbeat, Proposal, Result, Started, Vote
from bus.natstypes import Msg
from bus.quorum import Ballot, Rule, tally
from runtime.agent import logs
from runtime.agent.link import Roster
from runtime.ops.common import bus_urls_of, config_dir, load_config_dir, read_seed

SUBJECT = "zeta.>"
FORGET_AFTER = timedelta(minutes=5)


def _clock(at: datetime) -> str:
    return format_time(at)[11:19]


def _shown(body: Heartbeat) -> tuple[object, ...]:
    """What a heartbeat line shows besides the tick: a change in any of it is printed."""
    return body.status, body.bus, body.kubernetes, body.frozen, body.version, body.pid


def _names(label: str, names: tuple[str, ...]) -> str:
    return f"{label} {', '.join(names)}" if names else ""


def _review(evidence: Mapping[str, object]) -> str:
    """The veto holder's review checks of a vote, counted (docs/safety.md)."""
    checks = evidence.get("checks")
    if not isinstance(checks, list) or not checks:
        return ""
    blocked = [str(c.get("check")) for c in checks
               if isinstance(c, dict) and c.get("result") == "block"]
    passed = f"{len(checks) - len(blocked)}/{len(checks)} review checks pass"
    return f" ({passed}; blocked by {', '.join(blocked)})" if blocked else f" ({passed})"


def describe(envelope: Envelope, body: BaseModel) -> str:
    """One line saying what a verified message says, for people."""
    who = envelope.sender
    match body:
        case Heartbeat():
            frozen = ", FROZEN" if body.frozen else ""
            return (f"{who}@{envelope.host} tick {body.tick}: {body.status} "
                    f"[bus {body.bus}, k8s {body.kubernetes}{frozen}; v{body.version} "
                    f"pid {body.pid}]")
        case Finding():
            return (f"{who} finding {body.state}: {body.policy} on {body.target.key}: "
                    f"{body.summary}")
        case Proposal():
            veto = f", veto {', '.join(body.quorum.veto)}" if body.quorum.veto else ""
            kind = "destructive" if body.destructive else "non-destructive"
            paths = f", {body.quorum.evidence.short()}" if body.quorum.evidence.needed else ""
            seen = f" [seen by {', '.join(body.paths)}]" if body.paths else ""
            return (f"{who} proposes {body.action} on {body.target.key} ({body.policy} step "
                    f"{body.step}, {kind}; {body.quorum.approvals} approvals{veto}{paths} by "
                    f"{_clock(body.quorum.deadline)}): {body.summary}{seen}")
        case Vote():
            seen = f" [seen by {', '.join(body.paths)}]" if body.paths else ""
            return (f"{who} votes {body.verdict}: {body.reason}{_review(body.evidence)}"
                    f"{seen}")
        case Decision():
            extra = "; ".join(filter(None, (
                _names("approvals:", body.approvals), _names("rejections:", body.rejections),
                _names("vetoes:", body.vetoes))))
            return f"{who} decided {body.outcome.upper()}: {body.reason}" + (
                f" ({extra})" if extra else "")
        case Started():
            return (f"{body.executor} started: lease {body.lease}, fencing token "
                    f"{body.fencing_token}")
        case Result():
            dry = " (dry run)" if body.dry_run else ""
            return (f"{who} result {body.outcome}{dry}: {body.action} on {body.target.key}: "
                    f"{body.detail}")
        case Control():
            scope = f" {body.policy}" if body.policy else (
                " every policy" if body.verb in ("pause", "resume") else "")
            until = f" until {format_time(body.until)}" if body.until else ""
            return f"{who} (operator) {body.verb}{scope}{until}: {body.reason}"
    return f"{who} sent a {envelope.kind}"


@dataclass
class _Open:
    proposal: Envelope
    rule: Rule
    ballots: list[Ballot] = field(default_factory=list)


@dataclass
class View:
    """What the watcher knows: presence, open proposals and their votes."""

    roster: Roster
    verifier: Verifier = field(init=False)
    presence: dict[str, tuple[Envelope, Heartbeat]] = field(default_factory=dict)
    open: dict[str, _Open] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.verifier = self.roster.verifier()

    def feed(self, subject: str, data: bytes,
             now: datetime) -> tuple[Accepted | Dropped, str | None]:
        """Verify one message, update the view, and say what a person should see of it.

        The line is None for a heartbeat that changes nothing the presence shows.
        """
        self._forget(now)
        outcome = self.verifier.check(subject, data, now)
        if isinstance(outcome, Dropped):
            return outcome, f"{_clock(now)} DROPPED {subject}: {outcome.reason}: {outcome.detail}"
        return outcome, self._update(outcome, now)

    def _forget(self, now: datetime) -> None:
        # A proposal whose proposer died never gets a decision; after its deadline
        # (and a while for the summary to show it expired) it is no longer open.
        for repair in [r for r, p in self.open.items() if now - p.rule.deadline > FORGET_AFTER]:
            del self.open[repair]

    def _update(self, accepted: Accepted, now: datetime) -> str | None:
        env, body, repair = accepted.envelope, accepted.body, accepted.envelope.repair or ""
        text = describe(env, body)
        match body:
            case Heartbeat():
                previous = self.presence.get(env.sender)
                self.presence[env.sender] = (env, body)
                if previous is not None and _shown(previous[1]) == _shown(body):
                    return None
            case Proposal():
                self.open[repair] = _Open(env, Rule.of(env.sender, body.quorum, body.paths))
            case Vote() if repair in self.open:
                pending = self.open[repair]
                pending.ballots.append(Ballot.of(env.id, env.sender, env.at, body))
                so_far = tally(pending.rule, pending.ballots, self.roster.voters, now)
                text += f"  [{so_far.outcome}: {so_far.reason}]"
            case Decision():
                self.open.pop(repair, None)
            case _:
                pass
        return f"{_clock(env.at)}{f' {repair}' if repair else ''} {text}"

    def summary(self, now: datetime) -> list[str]:
        """The presence table and the open proposals with their votes so far."""
        rows = [["PERSONA", "HOST", "LAST HEARTBEAT", "AGE", "BUS", "K8S", "FROZEN", "STATUS"]]
        for name in sorted(self.roster.keys):
            seen = self.presence.get(name)
            if seen is None:
                rows.append([name, "-", "never", "-", "-", "-", "-", "-"])
                continue
            env, body = seen
            age = max(0.0, (now - env.at).total_seconds())
            rows.append([name, env.host, _clock(env.at), f"{age:.0f}s", body.bus,
                         body.kubernetes, "yes" if body.frozen else "no", body.status])
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=False))
                 + "  " + row[-1] for row in rows]
        for repair, pending in sorted(self.open.items()):
            so_far = tally(pending.rule, pending.ballots, self.roster.voters, now)
            votes = ", ".join(f"{b.voter} {b.verdict}" for b in pending.ballots) or "no votes"
            proposal = Proposal.model_validate(pending.proposal.body)
            lines.append(f"open {repair}: {proposal.action} on {proposal.target.key} by "
                         f"{pending.rule.proposer}: {votes} [{so_far.outcome}: {so_far.reason}]")
        return lines


def json_line(subject: str, data: bytes, outcome: Accepted | Dropped) -> str:
    """The ``--json`` form: the envelope exactly as received, or the drop and its reason."""
    record: dict[str, Any]
    if isinstance(outcome, Dropped):
        record = {"subject": subject, "dropped": outcome.reason, "detail": outcome.detail}
    else:
        record = {"subject": subject, "envelope": json.loads(data)}
    return json.dumps(record, ensure_ascii=False)


async def watch(connection: Connection, view: View, out: TextIO, *, as_json: bool,
                summary_every: float | None, ready: TextIO | None = None) -> None:
    """Print the bus until SIGINT or SIGTERM. ``ready`` gets one line once subscribed.

    The first connect is retried forever (the bus may come up later), and a signal
    ends the watch whether or not it ever connected.
    """
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    def emit(line: str) -> None:
        print(line, file=out, flush=True)

    async def on_message(msg: Msg) -> None:
        outcome, text = view.feed(msg.subject, msg.data, datetime.now(UTC))
        if as_json:
            emit(json_line(msg.subject, msg.data, outcome))
        elif text is not None:
            emit(text)

    async def follow() -> None:
        await connection.connect()
        await connection.subscribe(SUBJECT, on_message)
        await connection.nc.flush()
        if ready is not None:
            print(f"watching {SUBJECT}: {len(view.roster.keys)} personas, "
                  f"{len(view.roster.operators)} operators known", file=ready, flush=True)
        while summary_every and not as_json:
            await asyncio.sleep(summary_every)
            for line in view.summary(datetime.now(UTC)):
                emit(line)
        await stop.wait()

    following = asyncio.create_task(follow())
    stopping = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait({following, stopping}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (following, stopping):
            task.cancel()
        await asyncio.gather(following, stopping, return_exceptions=True)
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        await connection.close()
    if not following.cancelled() and (failure := following.exception()) is not None:
        raise failure


# ---------------------------------------------------------------- the command


def watch_command(args: argparse.Namespace) -> int:
    config = load_config_dir(config_dir(args.config_dir))
    # Logs (bus reconnects) go to stderr: stdout is the view, or JSON lines for scripts.
    logs.configure(level="warning", stream=sys.stderr)
    connection = Connection(bus_urls_of(args, config), name="zeta-agent watch",
                            seed=read_seed(args.seed))
    view = View(Roster.of(config))
    asyncio.run(watch(connection, view, sys.stdout, as_json=args.json,
                               summary_every=args.summary_every or None, ready=sys.stderr))
    return 0
