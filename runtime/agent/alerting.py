"""Alerts out of the agent: to Alertmanager's API v2 and to signed webhooks, never lost.

``runtime.core.alerts`` decides what is true and when to post; this delivers. Every
change is first written to a spool in the state directory (one file per sink, the
newest state of each alert, written atomically), then posted by a background task
that retries with exponential backoff. So an Alertmanager that is down, a bus outage
or an agent restart loses nothing: after a restart the spool is delivered and the
alerts that were firing are remembered, so the first tick resolves those no longer
true instead of leaving them to lapse.

What waits in a spool is coalesced per alert (only its newest state is sent), and a
firing alert's ``endsAt`` is renewed when it is finally sent: an outage longer than
``resolveTimeout`` must not deliver a firing alert as already over.

Webhook bodies are ``{"version": 1, "sender": …, "alerts": [postableAlert…]}``, signed
with HMAC-SHA256 over ``<timestamp>.<body>`` (``X-Zeta-Timestamp`` and
``X-Zeta-Signature: sha256=<hex>``), so a receiver can refuse forgeries and replays.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

import structlog
import urllib3

from runtime.agent.metrics import Metrics
from runtime.config.credentials import SEED_LIMIT, credential_path
from runtime.config.files import UnreadableError, read_regular, read_text, write_atomic
from runtime.config.loading import ConfigSet
from runtime.core.alerts import (
    Alert,
    AlertBook,
    Breaker,
    FleetState,
    Freeze,
    Paused,
    Posting,
    RepairAlerts,
    SilentPeer,
    fleet_alerts,
)
from runtime.core.engine import (
    BreakerTripped,
    Event,
    Finding,
    FindingCleared,
    Intent,
    StepFailed,
)
from runtime.core.ports import Wall, utc_now

log = structlog.get_logger("zeta.alerts")

POST_TIMEOUT = 5.0
BACKOFF_MAX = 60.0


class DeliveryError(Exception):
    """A sink did not take the alerts; the message says what it answered."""


class Sink(Protocol):
    name: str

    def post(self, alerts: Sequence[Mapping[str, Any]]) -> None:
        """Deliver, or raise DeliveryError. Blocking: called in a worker thread."""
        ...


def _send(http: urllib3.PoolManager, url: str, body: bytes, headers: Mapping[str, str]) -> None:
    try:
        response = http.request("POST", url, body=body, headers={
            "Content-Type": "application/json", **headers},
            timeout=urllib3.Timeout(total=POST_TIMEOUT), retries=False)
    except urllib3.exceptions.HTTPError as exc:
        raise DeliveryError(f"{url}: {exc}") from None
    if not 200 <= response.status < 300:
        raise DeliveryError(f"{url}: HTTP {response.status}: "
                            f"{response.data[:200].decode('utf-8', 'replace')}")


class AlertmanagerSink:
    """``POST <base>/api/v2/alerts``: the list of postable alerts."""

    def __init__(self, base: str, http: urllib3.PoolManager) -> None:
        self.name = f"alertmanager {base}"
        self.url = base.rstrip("/") + "/api/v2/alerts"
        self._http = http

    def post(self, alerts: Sequence[Mapping[str, Any]]) -> None:
        _send(self._http, self.url, json.dumps(list(alerts)).encode("utf-8"), {})


def signature(secret: bytes, timestamp: str, body: bytes) -> str:
    """The ``X-Zeta-Signature`` of a webhook body sent at ``timestamp``."""
    mac = hmac.new(secret, timestamp.encode("ascii") + b"." + body, hashlib.sha256)
    return f"sha256={mac.hexdigest()}"


class WebhookSink:
    """A generic JSON receiver, the body signed with the webhook's secret."""

    def __init__(self, url: str, secret: bytes | None, sender: str, http: urllib3.PoolManager,
                 clock: Callable[[], float] = time.time) -> None:
        self.name = f"webhook {url}"
        self.url = url
        self._secret = secret
        self._sender = sender
        self._http = http
        self._clock = clock

    def post(self, alerts: Sequence[Mapping[str, Any]]) -> None:
        body = json.dumps({"version": 1, "sender": self._sender, "alerts": list(alerts)},
                          separators=(",", ":")).encode("utf-8")
        headers = {}
        if self._secret is not None:
            timestamp = str(int(self._clock()))
            headers = {"X-Zeta-Timestamp": timestamp,
                       "X-Zeta-Signature": signature(self._secret, timestamp, body)}
        _send(self._http, self.url, body, headers)


# ---------------------------------------------------------------- the spool


@dataclass
class _Queue:
    """One sink's undelivered alert states, newest per alert, and its retry schedule."""

    sink: Sink
    path: Path
    pending: dict[str, dict[str, Any]]
    failures: int = 0
    retry_at: float = 0.0


def _identity(posted: Mapping[str, Any]) -> str:
    return json.dumps(posted["labels"], sort_keys=True)


def _load(path: Path) -> Any:
    try:
        return json.loads(read_text(path))
    except (UnreadableError, ValueError, RecursionError):
        return None


class Alerter:
    """Turns each tick's true alerts into postings, spools them and delivers them."""

    def __init__(self, sinks: Iterable[Sink], *, book: AlertBook, spool: Path, metrics: Metrics,
                 wall: Wall = utc_now, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        self.book = book
        self._spool = spool
        self._metrics = metrics
        self._wall, self._clock, self._sleep = wall, clock, sleep
        self._wake = asyncio.Event()
        spool.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._queues = [self._queue(index, sink) for index, sink in enumerate(sinks)]
        self._restore_firing()

    def _queue(self, index: int, sink: Sink) -> _Queue:
        path = self._spool / f"pending-{index}.json"
        stored = _load(path)
        pending = stored.get("pending", {}) if isinstance(stored, dict) and stored.get(
            "sink") == sink.name else {}
        if pending:
            log.info("alerts spooled before the restart will be delivered", sink=sink.name,
                     count=len(pending))
        return _Queue(sink, path, pending if isinstance(pending, dict) else {})

    def _restore_firing(self) -> None:
        stored = _load(self._spool / "firing.json")
        for item in stored if isinstance(stored, list) else []:
            try:
                alert = Alert(item["name"], item["severity"], dict(item["labels"]),
                              item["summary"], dict(item["annotations"]))
                self.book.remember(alert, datetime.fromisoformat(item["since"]))
            except (KeyError, TypeError, ValueError):
                log.warning("a remembered alert could not be read; skipped", item=str(item)[:200])

    # ------------------------------------------------------------ each tick

    def update(self, true_now: Iterable[Alert]) -> int:
        """Spool what changed since the last tick; returns how many postings that made."""
        now = self._wall()
        postings = self.book.update(true_now, now)
        if postings:
            for queue in self._queues:
                for posting in postings:
                    queue.pending[_identity(posting.as_json())] = _spooled(posting)
                self._save(queue)
            self._save_firing(now)
            self._wake.set()
            for posting in postings:
                log.info("alert resolved" if posting.resolved else "alert firing",
                         alert=posting.alert.name, labels=dict(posting.alert.labels),
                         summary=posting.alert.summary)
        self._metrics.alerts(len(self.book.firing),
                             {q.sink.name: len(q.pending) for q in self._queues})
        return len(postings)

    def _save(self, queue: _Queue) -> None:
        try:
            write_atomic(queue.path, json.dumps({"sink": queue.sink.name,
                                                 "pending": queue.pending}).encode("utf-8"),
                         mode=0o600)
        except OSError as exc:  # kept in memory all the same; delivery does not wait for disk
            log.error("alert spool not written", path=str(queue.path), error=str(exc))

    def _save_firing(self, now: datetime) -> None:
        firing = [{"name": a.name, "severity": a.severity, "labels": dict(a.labels),
                   "summary": a.summary, "annotations": dict(a.annotations),
                   "since": (self.book.since(a) or now).isoformat()} for a in self.book.firing]
        try:
            write_atomic(self._spool / "firing.json", json.dumps(firing).encode("utf-8"),
                         mode=0o600)
        except OSError as exc:
            log.error("firing alerts not written", error=str(exc))

    # ------------------------------------------------------------ delivery

    async def run(self) -> None:
        """Deliver forever: every queue with something pending, retried with backoff."""
        while True:
            await self.deliver()
            waits = [q.retry_at - self._clock() for q in self._queues if q.pending]
            self._wake.clear()
            with contextlib.suppress(TimeoutError):  # a retry falls due
                await asyncio.wait_for(self._wake.wait(),
                                       timeout=max(min(waits), 0.05) if waits else None)

    async def deliver(self) -> None:
        """One attempt for each queue that is due."""
        for queue in self._queues:
            if not queue.pending or self._clock() < queue.retry_at:
                continue
            batch = dict(queue.pending)
            alerts = [_renewed(posted, self._wall(), self.book.resolve_timeout)
                      for posted in batch.values()]
            try:
                await asyncio.to_thread(queue.sink.post, alerts)
            except DeliveryError as exc:
                queue.failures += 1
                delay = min(BACKOFF_MAX, 2.0 ** (queue.failures - 1))
                queue.retry_at = self._clock() + delay
                self._metrics.alert_post(queue.sink.name, ok=False, pending=len(queue.pending))
                log.warning("alerts not delivered; will retry", sink=queue.sink.name,
                            error=str(exc), pending=len(queue.pending), retry_in=delay,
                            attempt=queue.failures)
                continue
            for key, posted in batch.items():
                if queue.pending.get(key) is posted:  # not replaced by a newer state meanwhile
                    del queue.pending[key]
            if queue.failures:
                log.info("alerts delivered again", sink=queue.sink.name, attempts=queue.failures)
            queue.failures, queue.retry_at = 0, 0.0
            self._save(queue)
            self._metrics.alert_post(queue.sink.name, ok=True, pending=len(queue.pending))


def _spooled(posting: Posting) -> dict[str, Any]:
    return {**posting.as_json(), "resolved": posting.resolved}


def _renewed(posted: Mapping[str, Any], now: datetime, ahead: timedelta) -> dict[str, Any]:
    """The postable alert as sent now: a firing one ends ``ahead`` of now, not of when it
    was spooled (which may be long past after an outage)."""
    alert = {k: v for k, v in posted.items() if k != "resolved"}
    if not posted.get("resolved"):
        alert["endsAt"] = (now + ahead).isoformat().replace("+00:00", "Z")
    return alert


# ---------------------------------------------------------------- what the agent saw


HEARD_WITHIN = timedelta(seconds=45)
"""A peer heard from this recently is alive for the choice of a fleet alert's owner."""


class AgentAlerts:
    """What one agent knows that people must hear: fed by the tick, handed to the Alerter.

    The repair alerts come from the engine's events and from what this agent carried
    out; the fleet alerts from its engine's breakers, the bus view's freeze and the
    peer-silent findings, each sent only if this agent owns it.
    """

    def __init__(self, persona: str, *, alerter: Alerter, runners: Mapping[str, frozenset[str]],
                 everyone: frozenset[str], peer_policies: frozenset[str]) -> None:
        self.persona = persona
        self.alerter = alerter
        self.repairs = RepairAlerts(persona)
        self._runners = runners
        self._everyone = everyone
        self._peer_policies = peer_policies  # the policies whose findings are silent peers
        self._breaker_reasons: dict[str, str] = {}

    def events(self, events: Iterable[Event], repair_of: Callable[[str], str | None]) -> None:
        """Read the engine's events (before the execution concludes their repairs)."""
        for event in events:
            match event:
                case StepFailed(intent=intent, reason=reason):
                    self.repairs.failed(intent.policy, intent.target.key, reason,
                                        repair_of(intent.id))
                case FindingCleared(finding=finding):
                    self.repairs.cleared(finding.policy, finding.target.key)
                case BreakerTripped(policy=policy):
                    self._breaker_reasons[policy] = event.reason

    def carried(self, intent: Intent, carried: str, repair: str | None) -> None:
        """An intent this agent carried out: an escalation is an alert until it clears."""
        if intent.action.name == "bus.escalate" and carried in ("launched", "succeeded"):
            message = getattr(intent.params, "message", None) or "the policy's steps are exhausted"
            self.repairs.escalated(intent.policy, intent.target.key, message, repair,
                                   guard=intent.guard)

    def tick(self, *, findings: Iterable[Finding], breakers: Iterable[str],
             freeze: Freeze | None, heard: Mapping[str, datetime], now: datetime,
             paused: Iterable[Paused] = ()) -> int:
        alive = frozenset(name for name, at in heard.items() if now - at <= HEARD_WITHIN)
        silent = tuple(SilentPeer(f.target.name, f.summary) for f in findings
                       if f.policy in self._peer_policies)
        state = FleetState(
            me=self.persona, alive=alive, runners=self._runners, everyone=self._everyone,
            breakers=tuple(Breaker(p, self._breaker_reasons.get(p, "tripped"))
                           for p in breakers),
            freeze=freeze, silent=silent, paused=tuple(paused))
        return self.alerter.update([*self.repairs.alerts, *fleet_alerts(state)])


def agent_alerts(config: ConfigSet, persona: str, *, state_dir: Path, metrics: Metrics,
                 environ: Mapping[str, str], wall: Wall = utc_now) -> AgentAlerts | None:
    """The persona's alerts as fleet.yaml's ``spec.alerting`` says, or None without sinks.

    A webhook whose secret cannot be read is left out and said so (the agent must
    start all the same: alerting is not what it repairs with).
    """
    spec = config.fleet.spec.alerting
    http = urllib3.PoolManager(num_pools=4)
    sinks: list[Sink] = [AlertmanagerSink(url, http) for url in spec.alertmanagers]
    for hook in spec.webhooks:
        secret = None
        if hook.secret is not None:
            path = credential_path(hook.secret, persona, config.fleet, environ)
            try:
                secret = read_regular(path, SEED_LIMIT).strip()
            except UnreadableError as exc:
                log.error("webhook left out: its secret cannot be read", url=hook.url,
                          secret=str(path), error=str(exc))
                continue
        sinks.append(WebhookSink(hook.url, secret, persona, http))
    if not sinks:
        return None
    runners: dict[str, set[str]] = {}
    for name, located in config.personas.items():
        for policy in located.value.spec.policies:
            runners.setdefault(policy, set()).add(name)
    peer_policies = frozenset(name for name, p in config.policies.items()
                              if p.value.spec.detect.kind == "peer-silent")
    book = AlertBook(resend=spec.resend, resolve_timeout=spec.resolveTimeout)
    alerter = Alerter(sinks, book=book, spool=state_dir / "alerts", metrics=metrics, wall=wall)
    return AgentAlerts(persona, alerter=alerter,
                       runners={p: frozenset(n) for p, n in runners.items()},
                       everyone=frozenset(config.personas), peer_policies=peer_policies)
