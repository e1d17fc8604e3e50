"""Alerts to people (issue 15, part 1): which alerts fire and when they are posted, and
their delivery to a real Alertmanager (built from the Go module proxy, pinned and
cached) and to a real HTTP webhook receiver, through outages and restarts.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lab import tools
from runtime.agent.alerting import (
    AgentAlerts,
    Alerter,
    AlertmanagerSink,
    WebhookSink,
    signature,
)
from runtime.agent.metrics import Metrics
from runtime.core.alerts import (
    Alert,
    AlertBook,
    Breaker,
    FleetState,
    Freeze,
    RepairAlerts,
    SilentPeer,
    fleet_alerts,
    owner,
)
from tests.prereq import missing

T0 = datetime(2026, 12, 4, 12, 0, tzinfo=UTC)
RESEND, RESOLVE = timedelta(minutes=1), timedelta(minutes=5)


def alert(name: str = "ZetaEscalated", target: str = "node/worker-1", summary: str = "s") -> Alert:
    return Alert(name, "critical", {"persona": "otto", "policy": "node-not-ready",
                                    "target": target}, summary, {"command": "zeta-agent audit"})


def book() -> AlertBook:
    return AlertBook(resend=RESEND, resolve_timeout=RESOLVE)


# ---------------------------------------------------------------- when to post


def test_an_alert_is_posted_refreshed_while_true_and_resolved_once() -> None:
    alerts = book()
    [first] = alerts.update([alert()], T0)
    assert (first.starts, first.ends, first.resolved) == (T0, T0 + RESOLVE, False)
    assert alerts.update([alert()], T0 + timedelta(seconds=30)) == [], "not before resend"
    [again] = alerts.update([alert()], T0 + RESEND)
    assert (again.starts, again.ends) == (T0, T0 + RESEND + RESOLVE), "startsAt is kept"
    [gone] = alerts.update([], T0 + 2 * RESEND)
    assert (gone.resolved, gone.ends) == (True, T0 + 2 * RESEND)
    assert alerts.update([], T0 + 3 * RESEND) == []


def test_a_changed_summary_is_posted_at_once() -> None:
    alerts = book()
    alerts.update([alert(summary="one")], T0)
    [changed] = alerts.update([alert(summary="two")], T0 + timedelta(seconds=1))
    assert changed.alert.summary == "two"


@given(st.lists(st.frozensets(st.sampled_from(["a", "b", "c"])), min_size=1, max_size=30))
def test_every_alert_that_stops_is_resolved_once_and_a_firing_one_never_lapses(
        steps: list[frozenset[str]]) -> None:
    alerts = book()
    ends: dict[str, datetime] = {}
    for index, names in enumerate(steps):
        now = T0 + index * timedelta(seconds=40)
        posted = alerts.update([alert(target=n) for n in names], now)
        resolved = {p.alert.labels["target"] for p in posted if p.resolved}
        assert resolved == set(ends) - names, "resolved exactly the ones that stopped"
        for name in resolved:
            del ends[name]
        for posting in posted:
            if not posting.resolved:
                ends[posting.alert.labels["target"]] = posting.ends
        for name in names:
            assert ends[name] > now + RESOLVE - RESEND, "refreshed before it could lapse"


def test_a_remembered_alert_is_resolved_when_no_longer_true() -> None:
    alerts = book()
    alerts.remember(alert(), T0)
    [resolved] = alerts.update([], T0 + RESEND)
    assert resolved.resolved
    assert resolved.starts == T0


def test_one_agent_owns_a_fleet_alert_and_the_bus_down_makes_each_its_own_owner() -> None:
    everyone = {"alexa", "lior", "otto", "riven", "vera"}
    assert owner("alexa", everyone, everyone)
    assert not owner("otto", everyone, everyone)
    assert owner("lior", everyone, everyone - {"alexa"}), "the next one takes over"
    assert all(owner(me, everyone, set()) for me in everyone), "no bus: nobody is heard"


def test_fleet_alerts_carry_no_sender_so_owners_change_without_a_second_alert() -> None:
    state = FleetState(me="alexa", alive=frozenset({"alexa", "otto"}),
                       runners={"node-not-ready": frozenset({"alexa", "otto"})},
                       breakers=(Breaker("node-not-ready", "4/9 unhealthy"),),
                       freeze=Freeze("an operator", "etcd upgrade"),
                       silent=(SilentPeer("vera", "vera silent for 5m"),),
                       everyone=frozenset({"alexa", "otto", "vera"}))
    alerts = {a.name: a for a in fleet_alerts(state)}
    assert set(alerts) == {"ZetaBreakerTripped", "ZetaFleetFrozen", "ZetaPeerSilent"}
    assert all("persona" not in a.labels for a in alerts.values())
    assert "breaker-reset --policy node-not-ready" in alerts["ZetaBreakerTripped"].annotations[
        "command"]
    assert fleet_alerts(FleetState(**{**vars(state), "me": "otto"})) == [], "alexa owns them"


def test_a_repair_alert_lasts_until_its_finding_clears() -> None:
    repairs = RepairAlerts("otto")
    repairs.failed("node-not-ready", "node/w1", "verify not met within 5m", "01J")
    repairs.escalated("node-not-ready", "node/w2", "steps exhausted", None,
                      guard="3 repairs in 1h")
    names = {(a.name, a.labels["target"]) for a in repairs.alerts}
    assert names == {("ZetaRepairFailed", "node/w1"), ("ZetaLoopGuardStopped", "node/w2")}
    [failed] = [a for a in repairs.alerts if a.name == "ZetaRepairFailed"]
    assert failed.annotations["command"] == "zeta-agent audit --repair 01J"
    repairs.cleared("node-not-ready", "node/w1")
    assert {a.labels["target"] for a in repairs.alerts} == {"node/w2"}


# ---------------------------------------------------------------- real receivers


@dataclass
class Receiver:
    """A real HTTP server recording every POST; ``fail`` answers 500 that many times."""

    url: str
    bodies: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    fail: int = 0

    def json(self) -> list[Any]:
        return [json.loads(body) for _, body in self.bodies]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    record = Receiver("")

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            if record.fail:
                record.fail -= 1
                self.send_response(500)
                self.end_headers()
                return
            record.bodies.append((dict(self.headers), body))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *_: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    record.url = f"http://127.0.0.1:{server.server_address[1]}/hook"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield record
    server.shutdown()
    server.server_close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Alertmanager:
    """The real Alertmanager, routing everything to ``receiver`` at once."""

    def __init__(self, directory: Path, receiver: Receiver, port: int | None = None) -> None:
        try:
            self.binary = tools.alertmanager()
        except tools.ToolUnavailableError as exc:
            missing(f"Alertmanager is not available: {exc}")
        self.directory = directory
        self.port = port or _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "am.yml").write_text(json.dumps({
            "route": {"receiver": "hook", "group_by": ["..."], "group_wait": "0s",
                      "group_interval": "1s", "repeat_interval": "1h"},
            "receivers": [{"name": "hook", "webhook_configs": [
                {"url": receiver.url, "send_resolved": True}]}]}))
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> Alertmanager:
        self.process = subprocess.Popen(
            [str(self.binary), f"--config.file={self.directory / 'am.yml'}",
             f"--storage.path={self.directory / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--cluster.listen-address="],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as answer:
                    if answer.status == 200:
                        return self
            except OSError:
                time.sleep(0.1)
        raise AssertionError("alertmanager did not become ready")

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=10)
            self.process = None

    def active(self) -> list[dict[str, Any]]:
        with urllib.request.urlopen(f"{self.url}/api/v2/alerts?active=true", timeout=5) as got:
            alerts: list[dict[str, Any]] = json.loads(got.read())
        return [a for a in alerts if a["status"]["state"] == "active"]


@pytest.fixture
def alertmanager(tmp_path: Path, receiver: Receiver) -> Iterator[Alertmanager]:
    am = Alertmanager(tmp_path / "am", receiver).start()
    yield am
    am.stop()


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _alerter(spool: Path, sinks: list[Any], clock: Clock | None = None) -> Alerter:
    return Alerter(sinks, book=book(), spool=spool, metrics=Metrics("otto"),
                   clock=clock or Clock())


def _wait(condition: Any, what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_alertmanager_gets_the_alert_notifies_and_resolves_it(
        tmp_path: Path, alertmanager: Alertmanager, receiver: Receiver) -> None:
    import urllib3
    alerter = _alerter(tmp_path / "spool", [AlertmanagerSink(alertmanager.url,
                                                             urllib3.PoolManager())])
    assert alerter.update([alert()]) == 1
    asyncio.run(alerter.deliver())
    [active] = alertmanager.active()
    assert active["labels"] == {"alertname": "ZetaEscalated", "severity": "critical",
                                "source": "zeta-agent", "persona": "otto",
                                "policy": "node-not-ready", "target": "node/worker-1"}
    assert active["annotations"]["command"] == "zeta-agent audit"
    _wait(lambda: any(b["status"] == "firing" for b in receiver.json()), "the notification")
    assert alerter.update([]) == 1
    asyncio.run(alerter.deliver())
    assert alertmanager.active() == []
    _wait(lambda: any(b["status"] == "resolved" for b in receiver.json()), "the resolution")


def test_an_alertmanager_outage_and_an_agent_restart_lose_nothing(
        tmp_path: Path, receiver: Receiver) -> None:
    import urllib3
    am = Alertmanager(tmp_path / "am", receiver)  # not started: the outage
    spool = tmp_path / "spool"
    clock = Clock()
    first = _alerter(spool, [AlertmanagerSink(am.url, urllib3.PoolManager())], clock)
    first.update([alert(target="node/a"), alert(target="node/b")])
    asyncio.run(first.deliver())
    asyncio.run(first.deliver())  # not due yet: backoff
    assert json.loads((spool / "pending-0.json").read_text())["pending"], "spooled on disk"
    # The agent restarts while Alertmanager is still down, and a is resolved meanwhile.
    clock.now += 3600
    second = _alerter(spool, [AlertmanagerSink(am.url, urllib3.PoolManager())], clock)
    second.update([alert(target="node/b")])
    am.start()
    try:
        asyncio.run(second.deliver())
        assert [a["labels"]["target"] for a in am.active()] == ["node/b"], (
            "b firing (its endsAt renewed at delivery, though spooled an hour ago), a resolved")
        assert not json.loads((spool / "pending-0.json").read_text())["pending"]
    finally:
        am.stop()


def test_a_webhook_is_signed_retried_and_verifiable(
        tmp_path: Path, receiver: Receiver) -> None:
    import urllib3
    secret = b"s3cret"
    receiver.fail = 2
    clock = Clock()
    alerter = _alerter(tmp_path / "spool",
                       [WebhookSink(receiver.url, secret, "otto", urllib3.PoolManager())], clock)
    alerter.update([alert()])
    for _ in range(3):  # two refusals (500), then delivered: each retry after its backoff
        asyncio.run(alerter.deliver())
        clock.now += 120
    [(headers, body)] = receiver.bodies
    assert hmac.compare_digest(headers["X-Zeta-Signature"],
                               signature(secret, headers["X-Zeta-Timestamp"], body))
    assert not hmac.compare_digest(headers["X-Zeta-Signature"],
                                   signature(b"wrong", headers["X-Zeta-Timestamp"], body))
    document = json.loads(body)
    assert (document["version"], document["sender"]) == (1, "otto")
    assert document["alerts"][0]["labels"]["alertname"] == "ZetaEscalated"


def test_agent_alerts_follow_the_engine_and_what_the_agent_carried_out(tmp_path: Path) -> None:
    from bus.messages import Target
    from runtime.core.engine import FindingCleared, StepFailed
    from tests.builders import intent

    posted: list[list[Any]] = []

    class Recorder:
        name = "recorder"

        def post(self, alerts: list[Any]) -> None:
            posted.append(alerts)

    alerter = _alerter(tmp_path / "spool", [Recorder()])
    watch = AgentAlerts("otto", alerter=alerter, runners={}, everyone=frozenset({"otto"}),
                        peer_policies=frozenset())
    cordon = intent("k8s.node.cordon", Target(kind="node", name="worker-1"))
    watch.events([StepFailed(cordon, "verify not met", T0)], lambda _: "01JREPAIR")
    watch.carried(intent("bus.escalate", Target(kind="node", name="worker-1")), "succeeded", None)
    watch.tick(findings=(), breakers=(), freeze=None, heard={}, now=T0)
    asyncio.run(alerter.deliver())
    assert {a["labels"]["alertname"] for a in posted[-1]} == {"ZetaRepairFailed",
                                                            "ZetaEscalated"}
    watch.events([FindingCleared(cordon.finding, T0)], lambda _: None)
    watch.tick(findings=(), breakers=(), freeze=None, heard={}, now=T0)
    asyncio.run(alerter.deliver())
    assert all(a["endsAt"] <= datetime.now(UTC).isoformat() for a in posted[-1])
