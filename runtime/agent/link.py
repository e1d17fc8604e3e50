"""The bus link: one persona's connection to the fleet, and what it knows of the bus.

``BusLink`` connects the persona to the bus (forever, in the background: the agent
observes whether or not the bus is up), sends its heartbeats, hears its peers', keeps
the freeze state, checks the JetStream resources, counts approvals from verified
decisions, hands proposals to the voter and publishes findings and results (journaled
while the bus is down). What it learns it writes into its ``BusView``, which the voter,
the execution, the bus observers and the loop read; nothing else writes it.

While the bus is unreachable, its JetStream resources have the wrong settings or do not
answer, or an operator froze the fleet, ``BusView.refusal()`` names the reason and
nothing destructive starts. Non-destructive repairs carry on; their results are
journaled locally and published when the bus returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta

import structlog
from pydantic import ValidationError

from bus import leases, subjects
from bus.connection import BusUnavailableError, Connection
from bus.envelope import Accepted, Dropped, Envelope, Verifier, format_time
from bus.jetstream import AUDIT_STREAM, LEASES_BUCKET, Settings, check
from bus.journal import Journal
from bus.keys import Signer
from bus.messages import (
    Control,
    Decision,
    Finding,
    Heartbeat,
    NodeReport,
    Proposal,
    Result,
    Started,
)
from bus.natstypes import BucketNotFoundError, JetStreamError, KeyValue, Msg, NatsError
from bus.protocol import Assess, Protocol
from bus.quorum import Tally
from bus.reading import Stored, read_stream
from runtime import __version__
from runtime.agent.metrics import Metrics
from runtime.config.loading import ConfigSet
from runtime.core.engine import (
    Event,
    FindingCleared,
    FindingOpened,
    Intent,
    PolicyEngine,
    policy_digest,
)
from runtime.core.ports import Domain, Fence, Observed, Outcome, Wall, utc_now
from runtime.model.formats import Persona, open_windows
from runtime.model.snapshot import LeaseObs, PeerObs, SourceStatus

log = structlog.get_logger("bus-link")

HEARTBEAT_EVERY = 5.0
MAX_REMEMBERED_PROPOSALS = 256
"""Undecided proposals remembered per proposer (decided ones are forgotten). Per
proposer, so that one key flooding proposals pushes out only its own."""

BUS_ERRORS = (BusUnavailableError, NatsError, JetStreamError, OSError, TimeoutError)


def _digest(items: Iterable[str]) -> str:
    return hashlib.sha256("\n".join(sorted(items)).encode()).hexdigest()


def jetstream_settings(config: ConfigSet) -> Settings:
    """What the fleet's bus settings say the audit stream and lease bucket must be."""
    bus = config.fleet.spec.bus
    return Settings(replicas=bus.auditReplicas, max_age=bus.auditMaxAge, lease_ttl=bus.leaseTtl)


def voters_of(config: ConfigSet) -> frozenset[str]:
    """Every persona that may vote: the eligible electorate of every quorum."""
    return frozenset(p.value.name for p in config.personas.values()
                     if "vote" in p.value.spec.duties)


@dataclass(frozen=True)
class FreezeState:
    """The freeze in force (None: thawed), and the signed time and id of the control
    that set it: a control moves the state only if it is newer by (time, id)."""

    control: Control | None = None
    at: datetime | None = None
    id: str = ""

    def after(self, other: FreezeState | None) -> FreezeState:
        """The state once ``other`` is taken into account: whichever is newer."""
        if other is None or other.at is None:
            return self
        if self.at is None or (other.at, other.id) > (self.at, self.id):
            return other
        return self


ALL_POLICIES = "*"
"""The scope of a pause or resume that names no policy."""


@dataclass(frozen=True)
class Pause:
    """An operator's hold on a policy's repairs (or every policy's), lapsing at ``until``."""

    scope: str
    reason: str
    by: str
    at: datetime
    id: str
    until: datetime


class Pauses:
    """The pauses in force, from signed pause and resume controls in any order.

    A control counts by its signed time (then id), never by arrival: a pause older than
    the last resume of its scope (or of every policy) stays lifted, and a delayed old
    resume lifts no newer pause. Expiry needs no message: a pause past ``until`` holds
    nothing.
    """

    def __init__(self) -> None:
        self._pauses: dict[str, Pause] = {}
        self._resumed: dict[str, tuple[datetime, str]] = {}

    def apply(self, control: Control, *, by: str, at: datetime, id: str) -> bool:
        """Take a pause or resume into account; False if it is older than the state."""
        scope = control.policy or ALL_POLICIES
        stamp = (at, id)
        if control.verb == "pause":
            assert control.until is not None
            lifted = max(self._resumed.get(scope, (at, "")), self._resumed.get(
                ALL_POLICIES, (at, "")))
            current = self._pauses.get(scope)
            if stamp < lifted or (current is not None and stamp < (current.at, current.id)):
                return False
            self._pauses[scope] = Pause(scope, control.reason, by, at, id, control.until)
            return True
        if stamp < self._resumed.get(scope, stamp):
            return False
        self._resumed[scope] = stamp
        for key, pause in list(self._pauses.items()):
            if (scope in (ALL_POLICIES, key)) and (pause.at, pause.id) < stamp:
                del self._pauses[key]
        return True

    def active(self, now: datetime) -> list[Pause]:
        return sorted((p for p in self._pauses.values() if now < p.until),
                      key=lambda p: p.scope)

    def holding(self, policy: str, now: datetime) -> Pause | None:
        """The pause that holds ``policy``'s repairs now, if any."""
        for pause in self.active(now):
            if pause.scope in (ALL_POLICIES, policy):
                return pause
        return None


def peek_control(data: bytes) -> Control | None:
    """The control body of a message that did not verify, if it has one: to tell an
    unverifiable freeze from junk. Never trusted beyond that."""
    try:
        body = json.loads(data).get("body")
        return Control.model_validate(body)
    except (ValueError, AttributeError, ValidationError, RecursionError):
        return None


@dataclass(frozen=True)
class Roster:
    """Who is who on the bus, from configuration only: persona and operator keys, voters."""

    keys: Mapping[str, str]
    operators: Mapping[str, str]
    voters: frozenset[str]
    freshness: timedelta = timedelta(seconds=30)

    @classmethod
    def of(cls, config: ConfigSet) -> Roster:
        return cls(keys={name: p.value.spec.identity.nkey for name, p in config.personas.items()},
                   operators={o.name: o.nkey for o in config.fleet.spec.operators},
                   voters=voters_of(config), freshness=config.fleet.spec.bus.freshness)

    def verifier(self) -> Verifier:
        """A live verifier: freshness and replay apply, as in an agent."""
        return Verifier(keys=self.keys, operators=self.operators, freshness=self.freshness)




class Approvals:
    """Approved repairs per policy, counted from verified messages only (a policy's
    ``budget.perHour``): a decision counts when it is signed by the proposer of a
    proposal this agent saw verified, and by no one else."""

    def __init__(self) -> None:
        # proposer → repair id → policy, of verified proposals not decided yet
        self._proposed: dict[str, dict[str, str]] = {}
        self._approved: dict[str, deque[datetime]] = {}  # policy → approval times

    def proposed(self, envelope: Envelope, proposal: Proposal) -> None:
        """Remember who proposed what (called for verified proposals only)."""
        if envelope.repair is None:
            return
        mine = self._proposed.setdefault(envelope.sender, {})
        if len(mine) >= MAX_REMEMBERED_PROPOSALS:
            del mine[next(iter(mine))]
        mine[envelope.repair] = proposal.policy

    def decided(self, envelope: Envelope, decision: Decision) -> bool:
        """Count a verified decision; False when it counts toward no budget."""
        policy = self._proposed.get(envelope.sender, {}).pop(envelope.repair or "", None)
        if policy is None:
            return False
        if decision.outcome == "approved":
            self._approved.setdefault(policy, deque(maxlen=1000)).append(envelope.at)
        return True

    def last_hour(self, policy: str, now: datetime) -> int:
        return sum(1 for at in self._approved.get(policy, ()) if now - at < timedelta(hours=1))


class BusView:
    """What this agent knows of the bus. Its ``BusLink`` keeps it; every read of the
    lease bucket through it notes whether JetStream answered."""

    def __init__(self, connection: Connection, *, persona: str, personas: Iterable[str],
                 lease_ttl: timedelta, wall: Wall = utc_now) -> None:
        self.connection = connection
        self.persona = persona
        self.peer_names = tuple(sorted(name for name in personas if name != persona))
        self.lease_ttl = lease_ttl
        self.wall = wall
        self.kv: KeyValue | None = None
        self.problems: list[str] = []
        self.jetstream_error: str | None = None  # the last lease-bucket read that failed
        self.freeze = FreezeState()
        self.pauses = Pauses()
        self.peers: dict[str, PeerObs] = {}
        # When this agent began to hear heartbeats: a peer's silence is measured from
        # here, so peers not heard from *yet* at start-up are not counted as silent
        # (they would trip the peer-silent breaker on every fleet start).
        self.listening_since: datetime | None = None
        self.approvals = Approvals()

    @property
    def connected(self) -> bool:
        return self.connection.connected

    @property
    def frozen(self) -> Control | None:
        """The freeze in force, or None."""
        return self.freeze.control

    def refusal(self, *, compensation: bool = False) -> str | None:
        """Why destructive work must not start now, or None when it may.

        A freeze stops repairs, not their undoing: a ``compensation`` (an uncordon, a
        lease release) is refused only when no quorum could be reached at all.
        """
        if not self.connected:
            return "bus down"
        if self.problems:
            return "bus resources have incompatible settings: " + "; ".join(self.problems)
        if self.kv is None:
            return "bus connected but its JetStream resources are not ready yet"
        if self.jetstream_error is not None:
            # The local server answers but JetStream does not (on the minority side of a
            # partition it has no meta leader): no vote or lease could be stored.
            return f"bus connected but JetStream is not answering: {self.jetstream_error}"
        if self.frozen is not None and not compensation:
            return f"fleet frozen by {self.frozen.reason!r}"
        return None

    def describe(self) -> str:
        """The bus part of the status line."""
        if not self.connected:
            return "bus: down"
        if self.frozen is not None:
            return "bus: connected, FROZEN"
        if self.problems:
            return "bus: connected, resources incompatible"
        return "bus: connected" + (", JetStream not answering" if self.jetstream_error else "")

    async def leases(self) -> list[leases.Lease]:
        """Every live lease; raises what the bus raised, after noting that JetStream
        did not answer (a refusal until a read succeeds again)."""
        if self.kv is None:
            raise BusUnavailableError("lease bucket not ready")
        try:
            held = await leases.all_leases(self.kv)
        except BUS_ERRORS as exc:
            self.jetstream_error = (f"{type(exc).__name__}: {exc}" if str(exc)
                                    else type(exc).__name__)
            raise
        self.jetstream_error = None
        return held


class BusLink:
    """One persona's bus connection: presence, freeze, resources, votes asked and heard."""

    def __init__(self, view: BusView, *, persona: Persona, config: ConfigSet, signer: Signer,
                 host: str, engine: PolicyEngine, journal: Journal, metrics: Metrics,
                 assess: Assess | None, heartbeat_every: float = HEARTBEAT_EVERY) -> None:
        self.view = view
        self.persona = persona
        self.metrics = metrics
        self.engine = engine  # told of operators' breaker resets
        self.journal = journal
        self._heartbeat_every = heartbeat_every
        self._settings = jetstream_settings(config)
        self._windows = config.fleet.spec.maintenanceWindows
        self.verifier = Roster.of(config).verifier()
        self.metrics.watch_bus(lambda: view.connected, self.verifier.dropped)
        self.protocol = Protocol(
            view.connection, persona=persona.name, host=host, signer=signer,
            verifier=self.verifier, voters=voters_of(config), assess=assess,
            on_control=self._on_control, on_proposal=view.approvals.proposed)
        self._subscribed = False
        # Kept current by the loop after every tick, for the heartbeat.
        self._ticks, self._status, self._kubernetes = 0, "starting", "not observed"
        self._node: NodeReport | None = None
        self._scopes_digest = _digest(persona.spec.effective_scopes)
        self._policies_digest = _digest(policy_digest(p) for p in config.policies_of(persona))

    @property
    def connection(self) -> Connection:
        return self.view.connection

    def report(self, *, ticks: int, status: str, kubernetes: str) -> None:
        """What the next heartbeat says about this agent's loop."""
        self._ticks, self._status, self._kubernetes = ticks, status, kubernetes

    def report_node(self, node: NodeReport | None) -> None:
        """What the next heartbeat says about this host's kubelet (the latest snapshot's)."""
        self._node = node

    # ------------------------------------------------------------ lifecycle

    async def run(self) -> None:
        """Root task: connect (retrying forever), then send heartbeats until cancelled."""
        self.connection.on_connected.append(self._on_connected)
        await self.connection.connect()
        while True:
            if self.view.connected:
                await self.check_resources()
                with contextlib.suppress(*BUS_ERRORS):  # noted in the view
                    await self.view.leases()
            await self.heartbeat()
            await asyncio.sleep(self._heartbeat_every)

    async def close(self) -> None:
        await self.connection.close()

    async def _on_connected(self) -> None:
        """On each (re)connect: check resources, subscribe, restore freeze, flush the journal."""
        await self.check_resources()
        if not self._subscribed:
            # nats-py restores subscriptions on reconnect by itself.
            await self.protocol.subscribe()
            await self.connection.subscribe("zeta.agent.*.heartbeat", self._on_heartbeat)
            await self.connection.subscribe("zeta.repair.*.decided", self._on_decided)
            self._subscribed = True
            self.view.listening_since = self.view.wall()
        await self._restore_freeze()
        await self.journal.flush(self.connection)

    async def check_resources(self) -> None:
        """Look at the audit stream and lease bucket; refuse destructive work while they
        differ from what the fleet settings say (on every connect and every heartbeat:
        a resource weakened while the agents run must stop them too)."""
        view = self.view
        try:
            problems = await check(self.connection.js, self._settings)
            if view.kv is None:
                with contextlib.suppress(BucketNotFoundError):  # check() has said so
                    view.kv = await self.connection.js.key_value(LEASES_BUCKET)
        except BUS_ERRORS as exc:
            problems = [f"cannot check JetStream resources: {exc or type(exc).__name__}"]
        if problems != view.problems:
            for problem in problems:
                log.error("bus resources incompatible: destructive work refused",
                          problem=problem)
            if view.problems and not problems:
                log.info("bus resources are as configured again")
        view.problems = problems

    async def _restore_freeze(self) -> None:
        """A restarted or reconnected agent must stay frozen.

        Every control in the audit stream is read, and the state is the latest verified
        freeze or thaw by its signed time (then id), never by stream order: a replayed
        old thaw sorts before the freeze it would undo, and junk is skipped. A freeze
        that no longer verifies because its sender's key is no longer configured (an
        operator removed or rotated since) still holds, ordered by when the server
        stored it, until a verified thaw newer than that. What this agent holds in
        memory is merged in: it is only ever cleared by a newer verified thaw.
        """
        try:
            stored = await read_stream(self.connection.js, AUDIT_STREAM, "zeta.control.*")
        except BUS_ERRORS as exc:
            log.warning("cannot read the freeze state; keeping what this agent holds",
                        error=str(exc) or type(exc).__name__)
            return
        for message in stored:
            self.view.freeze = self.view.freeze.after(self._control_state(message))
        self._restore_pauses(stored)
        if self.view.frozen is not None and self.view.freeze.at is not None:
            log.warning("fleet is frozen: destructive work refused", reason=self.view.frozen.reason,
                        since=format_time(self.view.freeze.at))

    def _restore_pauses(self, stored: Iterable[Stored]) -> None:
        """Pauses survive a restart: every verified pause and resume, in signed order."""
        controls = []
        for message in stored:
            checked = self.verifier.check(message.subject, message.data, live=False)
            if (isinstance(checked, Accepted) and isinstance(checked.body, Control)
                    and checked.body.verb in ("pause", "resume")
                    and message.subject == subjects.control(checked.body.verb)):
                controls.append((checked.envelope.at, checked.envelope.id, checked))
        for at, id_, checked in sorted(controls, key=lambda c: (c[0], c[1])):
            assert isinstance(checked.body, Control)
            self.view.pauses.apply(checked.body, by=checked.envelope.sender, at=at, id=id_)
        for pause in self.view.pauses.active(self.view.wall()):
            log.warning("repairs paused", scope=pause.scope, by=pause.by, reason=pause.reason,
                        until=format_time(pause.until))

    def _control_state(self, message: Stored) -> FreezeState | None:
        """What one stored control says about the freeze, or None if it says nothing."""
        checked = self.verifier.check(message.subject, message.data, live=False)
        if isinstance(checked, Accepted):
            body = checked.body
            if not isinstance(body, Control) or body.verb not in ("freeze", "thaw") or (
                    message.subject != subjects.control(body.verb)):
                return None
            return FreezeState(body if body.verb == "freeze" else None, checked.envelope.at,
                               checked.envelope.id)
        if checked.reason not in ("unknown-sender", "wrong-key") or message.time is None:
            return None  # junk or a forgery of a configured key: skipped
        claim = peek_control(message.data)
        if claim is None or claim.verb != "freeze" or (
                message.subject != subjects.control("freeze")):
            return None
        log.error("a freeze in the audit stream no longer verifies; it holds until a "
                  "verified thaw newer than it", reason=checked.reason, detail=checked.detail,
                  stored=format_time(message.time))
        return FreezeState(Control(verb="freeze", reason=f"unverifiable freeze "
                                                         f"({checked.reason}): {claim.reason}"),
                           message.time, f"seq-{message.seq:020d}")


    # ------------------------------------------------------------ presence, findings, results

    async def heartbeat(self) -> None:
        if not self.view.connected:
            return
        # Results journaled while JetStream was unreachable with the connection up (a
        # partition, not a disconnect) would otherwise wait for the next reconnect.
        await self.journal.flush(self.connection)
        body = Heartbeat(
            pid=os.getpid(), version=__version__, tick=self._ticks, status=self._status,
            bus="connected", kubernetes=self._kubernetes, frozen=self.view.frozen is not None,
            paused=(*(p.scope for p in self.view.pauses.active(self.view.wall())),
                    *(f"window:{w.name}" for w, _ in open_windows(self._windows,
                                                                 self.view.wall()))),
            scopes_digest=self._scopes_digest, policies_digest=self._policies_digest,
            node=self._node)
        try:
            await self.protocol.send("heartbeat", body)
        except BUS_ERRORS as exc:
            log.debug("heartbeat not sent", error=str(exc))

    async def _on_heartbeat(self, msg: Msg) -> None:
        checked = self.verifier.check(msg.subject, msg.data)
        if not isinstance(checked, Accepted):
            log.warning("message dropped", subject=msg.subject, reason=checked.reason,
                        detail=checked.detail)
            return
        env = checked.envelope
        if env.sender != self.persona.name:
            assert isinstance(checked.body, Heartbeat)
            self.view.peers[env.sender] = PeerObs(persona=env.sender, last_heartbeat=env.at,
                                                  host=env.host, node=checked.body.node)

    async def publish_findings(self, events: Iterable[Event]) -> None:
        """Tell the bus which findings the engine opened and cleared this tick."""
        for event in events:
            if not isinstance(event, FindingOpened | FindingCleared) or not self.view.connected:
                continue
            f = event.finding
            body = Finding(state="opened" if isinstance(event, FindingOpened) else "cleared",
                           policy=f.policy, target=f.target, since=f.since, summary=f.summary,
                           evidence=dict(f.evidence))
            try:
                await self.protocol.send("finding", body)
            except BUS_ERRORS as exc:
                log.debug("finding not sent", error=str(exc))

    async def record(self, intent: Intent, repair: str, outcome: str, detail: str) -> None:
        """Publish a result; journal it when the bus is down so the audit gets it later."""
        body = Result(outcome=outcome, detail=detail, action=intent.action.name,
                      target=intent.target, policy=intent.policy, dry_run=intent.dry_run)
        envelope = self.protocol.seal("result", body, repair=repair)
        try:
            await self.connection.publish(subjects.result(repair), envelope)
        except BusUnavailableError as exc:
            self.journal.append(envelope)
            log.info("result journaled until the bus returns", repair=repair, error=str(exc))

    async def propose(self, proposal: Proposal) -> tuple[str, Tally]:
        """Ask the voters; the repair id and how the vote ended."""
        return await self.protocol.propose(proposal)

    async def started(self, repair: str, lease: leases.Lease) -> None:
        await self.protocol.send("started", Started(
            executor=self.persona.name, lease=leases.kv_key(lease.target),
            fencing_token=lease.token), repair=repair)

    # ------------------------------------------------------------ heard on the bus

    async def _on_decided(self, msg: Msg) -> None:
        checked = self.verifier.check(msg.subject, msg.data)
        if not isinstance(checked, Accepted) or not isinstance(checked.body, Decision):
            if isinstance(checked, Dropped):
                log.warning("message dropped", subject=msg.subject, reason=checked.reason,
                            detail=checked.detail)
            return
        env = checked.envelope
        if not self.view.approvals.decided(env, checked.body):
            # Only the proposer decides its proposal: a decision by anyone else, or on
            # a proposal never seen verified, counts toward no budget.
            log.warning("decision not counted", repair=env.repair, sender=env.sender,
                        reason="no verified proposal of the sender")
            return
        self.metrics.decision(checked.body.outcome)

    async def _on_control(self, envelope: Envelope, control: Control) -> None:
        log.warning("operator control", verb=control.verb, by=envelope.sender,
                    reason=control.reason, policy=control.policy)
        if control.verb in ("freeze", "thaw"):
            # Only a newer control moves the state: a thaw signed before the freeze it
            # meets (a delayed or replayed one) leaves the fleet frozen.
            newer = FreezeState(control if control.verb == "freeze" else None, envelope.at,
                                envelope.id)
            state = self.view.freeze.after(newer)
            if state is not newer:
                log.warning("operator control older than the freeze state: ignored",
                            verb=control.verb, at=format_time(envelope.at))
            self.view.freeze = state
        elif control.verb in ("pause", "resume"):
            if not self.view.pauses.apply(control, by=envelope.sender, at=envelope.at,
                                          id=envelope.id):
                log.warning("operator control older than the pause state: ignored",
                            verb=control.verb, at=format_time(envelope.at))
        elif control.policy is not None:
            self.engine.reset_breaker(control.policy, by=envelope.sender, at=envelope.at)


def bus_observers(view: BusView) -> list[BusObserver]:
    """The peers and leases observers, fed by what the link heard."""
    return [BusObserver("peers", view), BusObserver("leases", view)]


class BusObserver:
    """Peers (from heartbeats) or leases (from the KV bucket): None while the bus is down."""

    def __init__(self, domain: Domain, view: BusView) -> None:
        self._domain = domain
        self._view = view

    @property
    def name(self) -> str:
        return f"bus-{self._domain}"

    @property
    def provides(self) -> frozenset[Domain]:
        return frozenset({self._domain})

    async def observe(self, now: datetime) -> Observed:
        view = self._view
        if not view.connected:
            return Observed({}, SourceStatus(ok=False, detail="bus down"))
        if self._domain == "peers":
            peers = tuple(view.peers.get(name, PeerObs(persona=name,
                                                       last_heartbeat=view.listening_since))
                          for name in view.peer_names)
            return Observed({"peers": peers}, SourceStatus(ok=True, detail=f"{len(peers)} peers"))
        if view.kv is None:
            return Observed({}, SourceStatus(ok=False, detail="lease bucket not ready"))
        try:
            held = await view.leases()
        except BUS_ERRORS:
            return Observed({}, SourceStatus(ok=False, detail=f"leases not read: "
                                                              f"{view.jetstream_error}"))
        return Observed({"leases": tuple(LeaseObs(key=lease.target, repair=lease.repair,
                                                  holder=lease.executor, expires=lease.expires)
                                         for lease in held)},
                        SourceStatus(ok=True, detail=f"{len(held)} leases"))


class LeaseReleaser:
    """``bus.lease.release``: delete a repair lease whose holder let it expire.

    Re-reads the lease right before deleting, and deletes only that revision: a lease
    renewed or re-taken since the proposal is left alone.
    """

    def __init__(self, view: BusView) -> None:
        self._view = view

    async def run(self, intent: Intent, *, repair: str, dry_run: bool,
                  fence: Fence) -> Outcome:
        kv = self._view.kv
        if kv is None or not self._view.connected:
            return Outcome(False, "the lease bucket is not reachable")
        lease = await leases.holder(kv, intent.target.name)
        if lease is None:
            return Outcome(True, f"{intent.target.name}: no lease left to release")
        now = self._view.wall()
        if lease.expires > now:
            return Outcome(False, f"the lease of repair {lease.repair} is valid until "
                                  f"{lease.expires.isoformat()}: not releasing it")
        what = f"lease on {intent.target.name} (repair {lease.repair} by {lease.executor})"
        if dry_run:
            return Outcome(True, f"dry-run: would release the {what}")
        if not await fence():
            return Outcome(False, "our own lease on this target moved on: not acting")
        if await leases.release(kv, lease):
            return Outcome(True, f"released the {what}")
        return Outcome(False, f"the {what} changed before it could be released")
