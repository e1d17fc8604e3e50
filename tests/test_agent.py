"""The agent in-process: tick loop, watchdog, guarded root tasks, observers and actuators.

Time is fake: ``FakeTime`` stands in for the monotonic clock, ``asyncio.sleep`` and
the wall clock, and the test moves it forward explicitly, so a "hung for ten
seconds" scenario takes milliseconds and always unfolds the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import os
import stat
from collections.abc import Sequence
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from bus.messages import Target
from runtime.agent.escalate import Escalate
from runtime.agent.loop import Agent, Exit, Timing, state_directory, supervise
from runtime.agent.observing import Observing
from runtime.config.loading import load
from runtime.core.engine import Evaluation, PolicyEngine
from runtime.core.ports import (
    Actuator,
    Actuators,
    Domain,
    NoActuatorError,
    Observed,
    Observer,
    Outcome,
    unfenced,
)
from runtime.host.notify import Notifier
from runtime.host.observing import (
    ApiserverObserver,
    HealthObserver,
    UnitObserver,
    host_observers,
    parse_meminfo,
    parse_pressure,
    watched_units,
)
from runtime.host.systemctl import Systemctl, parse_show
from runtime.model.catalog import EscalateParams
from runtime.model.formats import Persona, RepairPolicy
from runtime.model.snapshot import Snapshot, SourceStatus, UnitObs
from tests.builders import T0, RecordingActuator, intent, local_agent, persona, policy, probe, unit

REPO = Path(__file__).resolve().parent.parent

# ---------------------------------------------------------------- test doubles


async def _settle() -> None:
    """Let every runnable task run until it blocks again (fake observers never do I/O)."""
    for _ in range(50):
        await asyncio.sleep(0)


class FakeTime:
    """A monotonic clock, ``sleep`` and wall clock that move only when the test says so."""

    def __init__(self) -> None:
        self.now = 0.0
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._order = itertools.count()

    def monotonic(self) -> float:
        return self.now

    def wall(self) -> datetime:
        return T0 + timedelta(seconds=self.now)

    async def sleep(self, seconds: float) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self.now + max(seconds, 0.0), next(self._order), future))
        await future

    async def advance(self, seconds: float) -> None:
        """Move forward, waking each sleeper at its own due time and letting it run."""
        end = self.now + seconds
        await _settle()
        while self._sleepers and self._sleepers[0][0] <= end:
            due, _, future = heapq.heappop(self._sleepers)
            self.now = max(self.now, due)
            if not future.done():
                future.set_result(None)
            await _settle()
        self.now = end


class RecordingNotifier(Notifier):
    """Keeps every sd_notify message with the fake time it was sent at."""

    def __init__(self, time: FakeTime) -> None:
        super().__init__(None)
        self.time = time
        self.sent: list[tuple[float, str]] = []

    def notify(self, *assignments: str) -> bool:
        self.sent.extend((self.time.now, a) for a in assignments)
        return True

    def times(self, message: str) -> list[float]:
        return [t for t, m in self.sent if m == message]

    def statuses(self) -> list[str]:
        return [m.removeprefix("STATUS=") for _, m in self.sent if m.startswith("STATUS=")]


class UnitsObserver:
    """Reports fixed unit states; can be told to hang (await forever) until released."""

    name = "units"
    provides: frozenset[Domain] = frozenset({"units"})

    def __init__(self, units: Sequence[UnitObs] = (), notifier: RecordingNotifier | None = None
                 ) -> None:
        self.units = tuple(units)
        self.notifier = notifier
        self.hang = False
        self.release = asyncio.Event()
        self.ready_when_observed: list[bool] = []

    async def observe(self, now: datetime) -> Observed:
        if self.notifier is not None:
            self.ready_when_observed.append(bool(self.notifier.times("READY=1")))
        if self.hang:
            await self.release.wait()
        return Observed({"units": self.units}, SourceStatus(ok=True))


class ProbeObserver:
    """Reports every API server path as failed (the evidence for apiserver-unreachable)."""

    name = "apiserver"
    provides: frozenset[Domain] = frozenset({"apiserver"})

    async def observe(self, now: datetime) -> Observed:
        return Observed({"apiserver": (probe("tcp", ok=False), probe("readyz", ok=False))},
                        SourceStatus(ok=True))


class FlakyEngine(PolicyEngine):
    """A real engine whose evaluate raises while ``broken`` is set."""

    broken = False

    def evaluate(self, snapshot: Snapshot) -> Evaluation:
        if self.broken:
            raise ZeroDivisionError("a bug in a detector")
        return super().evaluate(snapshot)


UNIT_START = policy("kubelet-down", {"kind": "unit-failed", "units": ["kubelet.service"]},
                    [{"action": "host.unit.start", "params": {"unit": "kubelet.service"}}])
K3S_RESTART = policy("cp-down", {"kind": "apiserver-unreachable", "minPaths": 2},
                     [{"action": "host.unit.restart", "params": {"unit": "k3s.service"},
                       "quorum": {"approvals": 2, "deadline": "30s"}}])
OTTO = persona("otto", scopes=["host:units:start:kubelet.service",
                               "host:units:restart:k3s.service"])
FAILED_KUBELET = unit("kubelet.service", "failed")


def make_agent(time: FakeTime, observers: Sequence[Observer], *,
               policies: Sequence[RepairPolicy] = (), who: Persona = OTTO,
               actuators: Actuators | None = None, engine: PolicyEngine | None = None,
               timing: Timing | None = None,
               notifier: RecordingNotifier | None = None) -> tuple[Agent, RecordingNotifier]:
    notifier = notifier or RecordingNotifier(time)
    agent = local_agent(
        who, engine=engine or PolicyEngine(policies), notifier=notifier,
        observing=Observing(observers, timeout=3600, host="cp-1"),
        actuators=actuators or Actuators(),
        timing=timing or Timing(tick=1.0, tick_timeout=2.0, watchdog=0.25, grace=1.0),
        clock=time.monotonic, sleep=time.sleep, wall=time.wall)
    return agent, notifier


# ---------------------------------------------------------------- readiness, status, watchdog


async def test_ready_after_the_first_observation_pass_then_status_each_tick() -> None:
    time = FakeTime()
    observer = UnitsObserver([unit("kubelet.service")])
    agent, notifier = make_agent(time, [observer], policies=[UNIT_START])
    observer.notifier = notifier
    await agent.tick()
    await agent.tick()
    assert observer.ready_when_observed == [False, True]
    assert notifier.times("READY=1") == [0.0]
    assert notifier.statuses() == [
        "tick 1: 0 findings open, 0 in flight, bus: disabled, k8s: not observed",
        "tick 2: 0 findings open, 0 in flight, bus: disabled, k8s: not observed",
    ]


async def test_watchdog_pings_only_while_ticks_complete() -> None:
    time = FakeTime()
    observer = UnitsObserver([unit("kubelet.service")])
    agent, notifier = make_agent(time, [observer])
    stop = asyncio.Event()
    with capture_logs() as logs:
        running = asyncio.create_task(agent.run(stop))
        await time.advance(3.1)  # ticks at 0, 1, 2 and 3 complete
        assert notifier.times("WATCHDOG=1") == pytest.approx([0.25 * i for i in range(1, 13)])

        observer.hang = True  # the tick due at 4.0 never finishes
        await time.advance(6.9)
        # Last completed tick at 3.0; tick 1s + tick timeout 2s: pings stop after 6.0.
        pings = notifier.times("WATCHDOG=1")
        assert max(pings) == pytest.approx(6.0)
        assert not [t for t in pings if t > 6.0]
        assert agent.ticks == 5
        assert notifier.statuses()[-1].startswith("tick 4:")

        observer.release.set()  # the stuck tick completes at 10.0 and the loop goes on
        await time.advance(1.0)
        assert [t for t in notifier.times("WATCHDOG=1") if t > 6.0] == pytest.approx(
            [10.25, 10.5, 10.75, 11.0])
        stop.set()
        assert await running == Exit(0)
    stalled = [e for e in logs if e["event"].startswith("tick loop stalled")]
    assert len(stalled) == 1
    assert stalled[0]["log_level"] == "error"
    assert any(e["event"].startswith("tick loop advancing again") for e in logs)


async def test_ticks_follow_a_fixed_grid_and_run_without_a_watchdog() -> None:
    time = FakeTime()
    agent, notifier = make_agent(time, [UnitsObserver()], timing=Timing(tick=1.0))
    stop = asyncio.Event()
    running = asyncio.create_task(agent.run(stop))
    await time.advance(2.5)
    assert agent.ticks == 3
    assert notifier.times("WATCHDOG=1") == []
    stop.set()
    assert await running == Exit(0)


async def test_an_exception_in_a_tick_is_logged_counted_and_survived() -> None:
    time = FakeTime()
    engine = FlakyEngine([UNIT_START])
    agent, notifier = make_agent(time, [UnitsObserver([unit("kubelet.service")])],
                                 engine=engine)
    with capture_logs() as logs:
        await agent.tick()
        engine.broken = True
        await agent.tick()
        engine.broken = False
        await agent.tick()
    ticks = [e for e in logs if e["event"] == "tick"]
    assert [e["log_level"] for e in ticks] == ["info", "error", "info"]
    assert isinstance(ticks[1]["exc_info"], ZeroDivisionError)
    assert [e["errors"] for e in ticks] == [0, 1, 0]
    assert ticks[2]["errors_total"] == 1
    assert agent.errors == 1
    assert notifier.statuses()[1].startswith("tick 2 failed (ZeroDivisionError): ")
    assert notifier.statuses()[2].endswith(", 1 tick error")
    assert agent.advancing()


async def test_run_once_reports_whether_the_tick_completed() -> None:
    time = FakeTime()
    engine = FlakyEngine([])
    agent, _ = make_agent(time, [UnitsObserver()], engine=engine)
    assert await agent.run_once() == 0
    engine.broken = True
    assert await agent.run_once() == 1


# ---------------------------------------------------------------- root tasks


async def test_a_dying_root_task_stops_the_others_and_exits_non_zero() -> None:
    class BrokenWatchdog(RecordingNotifier):
        def watchdog(self) -> bool:
            raise RuntimeError("notify socket gone mad")

    time = FakeTime()
    agent, _ = make_agent(time, [UnitsObserver()], notifier=BrokenWatchdog(time))
    with capture_logs() as logs:
        running = asyncio.create_task(agent.run(asyncio.Event()))
        await time.advance(0.25)
        result = await running
    assert result == Exit(1)
    ended = [e for e in logs if e["event"] == "root task ended"]
    assert [e["task"] for e in ended] == ["watchdog"]
    assert "notify socket gone mad" in ended[0]["error"]


async def test_supervise_treats_a_returning_root_task_as_a_failure() -> None:
    async def forever() -> None:
        await asyncio.Event().wait()

    async def returns() -> None:
        return None

    with capture_logs() as logs:
        result = await supervise({"a": forever(), "b": returns()}, asyncio.Event(), grace=1)
    assert result == Exit(1)
    assert [(e["task"], e["error"]) for e in logs] == [("b", "returned or was cancelled")]


async def test_supervise_stops_cleanly_on_request() -> None:
    cancelled: list[str] = []

    async def forever(name: str) -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.append(name)
            raise

    stop = asyncio.Event()
    stop.set()
    assert await supervise({"a": forever("a"), "b": forever("b")}, stop, grace=1) == Exit(0)
    assert sorted(cancelled) == ["a", "b"]


async def test_supervise_cancels_again_a_task_that_swallowed_one_cancellation() -> None:
    # nats-py swallows a CancelledError that lands while it flushes a publish: the
    # agent's bus task must still stop, not be abandoned (which exits non-zero).
    async def swallows_once() -> None:
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.Event().wait()
        await asyncio.Event().wait()  # the second cancellation ends this

    stop = asyncio.Event()
    stop.set()
    result = await supervise({"bus": swallows_once()}, stop, grace=2)
    assert result == Exit(0)


async def test_supervise_abandons_a_task_that_ignores_cancellation() -> None:
    release = asyncio.Event()

    async def stubborn() -> None:
        while not release.is_set():
            try:
                await release.wait()
            except asyncio.CancelledError:
                continue  # the bug being simulated: swallowing cancellation

    stop = asyncio.Event()
    stop.set()
    with capture_logs() as logs:
        result = await supervise({"stubborn": stubborn()}, stop, grace=0.01)
    assert result == Exit(0, abandoned=("stubborn",))
    assert logs[-1]["event"] == "root tasks ignored cancellation"
    release.set()
    await _settle()


# ---------------------------------------------------------------- deciding and acting


async def test_an_intent_without_an_actuator_is_refused_saying_so() -> None:
    time = FakeTime()
    agent, _ = make_agent(time, [UnitsObserver([FAILED_KUBELET])], policies=[UNIT_START])
    with capture_logs() as logs:
        await agent.tick()
        await time.advance(1)
        await agent.tick()
    refused = [e for e in logs if e["event"] == "intent refused"]
    assert len(refused) == 1
    assert refused[0]["reason"] == "no actuator for host.unit.start yet"
    assert refused[0]["target"] == "unit.cp-1/kubelet.service"
    held = [e for e in logs if e["event"] == "intent held"]
    assert "refused: no actuator for host.unit.start yet" in held[0]["reason"]
    tick = next(e for e in logs if e["event"] == "tick")
    assert (tick["findings_open"], tick["intents"], tick["refused"], tick["started"]) == (
        1, 1, 1, 0)


async def test_a_destructive_intent_is_refused_while_the_bus_is_down() -> None:
    time = FakeTime()
    actuator = RecordingActuator(Outcome(ok=True))
    agent, _ = make_agent(time, [ProbeObserver()], policies=[K3S_RESTART],
                          actuators=Actuators({"host.unit.restart": actuator}))
    with capture_logs() as logs:
        await agent.tick()
    refused = [e for e in logs if e["event"] == "intent refused"]
    assert [(e["action"], e["destructive"]) for e in refused] == [("host.unit.restart", True)]
    assert "bus down" in refused[0]["reason"]
    assert actuator.runs == []


async def test_a_quorum_intent_never_runs_without_a_bus_identity() -> None:
    time = FakeTime()
    actuator = RecordingActuator(Outcome(ok=True))
    agent, _ = make_agent(time, [ProbeObserver()], policies=[K3S_RESTART],
                          actuators=Actuators({"host.unit.restart": actuator}))
    assert agent.link is None
    with capture_logs() as logs:
        await agent.tick()
    [refused] = [e for e in logs if e["event"] == "intent refused"]
    assert "no bus identity" in refused["reason"]
    assert actuator.runs == []


async def test_an_intent_outside_the_scopes_is_refused() -> None:
    time = FakeTime()
    actuator = RecordingActuator(Outcome(ok=True))
    agent, _ = make_agent(time, [UnitsObserver([FAILED_KUBELET])], policies=[UNIT_START],
                          who=persona("otto"), actuators=Actuators({"host.unit.start": actuator}))
    with capture_logs() as logs:
        await agent.tick()
    [refused] = [e for e in logs if e["event"] == "intent refused"]
    assert "host:units:start:kubelet.service is not granted" in refused["reason"]
    assert actuator.runs == []


async def test_a_voter_leaves_remedies_to_the_executors_without_warning() -> None:
    time = FakeTime()
    actuator = RecordingActuator(Outcome(ok=True))
    voter = persona("riven", scopes=["host:units:start:kubelet.service"], duties=["vote"])
    agent, _ = make_agent(time, [UnitsObserver([FAILED_KUBELET])], policies=[UNIT_START],
                          who=voter, actuators=Actuators({"host.unit.start": actuator}))
    with capture_logs() as logs:
        await agent.tick()
    assert actuator.runs == []
    assert not [e for e in logs if e["event"] == "intent refused"], logs
    assert [e["event"] for e in logs if e["event"].startswith("intent")] == [
        "intent left to the executors"]
    tick = next(e for e in logs if e["event"] == "tick")
    assert (tick["findings_open"], tick["refused"], tick["holds"]) == (1, 0, 1)


async def test_escalating_puts_the_finding_on_the_record_for_people() -> None:
    escalate = Escalate()
    target = Target(kind="unit", name="kubelet.service", host="cp-1")
    params = EscalateParams(message="kubelet.service does not stay up")
    with capture_logs() as logs:
        outcome = await escalate.run(intent("bus.escalate", target, params), repair="R",
                                     dry_run=False, fence=unfenced)
    assert outcome == Outcome(ok=True, detail=(
        "escalated to people: kubelet.service does not stay up (finding: test; policy p, "
        "step 0)"))
    assert [e["event"] for e in logs] == ["escalated to people"]
    rehearsal = await escalate.run(intent("bus.escalate", target, EscalateParams(),
                                          dry_run=True), repair="R", dry_run=True, fence=unfenced)
    assert rehearsal.detail == ("dry-run: would escalate to people: the policy's steps are "
                                "exhausted (finding: test; policy p, step 0)")


async def test_an_allowed_intent_runs_on_its_actuator_and_is_reported() -> None:
    time = FakeTime()
    actuator = RecordingActuator(Outcome(ok=True, detail="started"))
    agent, notifier = make_agent(time, [UnitsObserver([FAILED_KUBELET])], policies=[UNIT_START],
                                 actuators=Actuators({"host.unit.start": actuator}))
    with capture_logs() as logs:
        await agent.tick()
        await agent.tick()
    assert actuator.runs == [("kubelet-down:unit.cp-1/kubelet.service:0:1", False)]
    finished = [e for e in logs if e["event"] == "action finished"]
    assert [(e["ok"], e["detail"]) for e in finished] == [(True, "started")]
    assert any(e["event"] == "repair.verified" for e in logs)
    assert notifier.statuses()[0].startswith("tick 1: 1 finding open, 0 in flight")


async def test_an_actuator_that_raises_fails_the_step() -> None:
    time = FakeTime()
    actuator = RecordingActuator(None)
    agent, _ = make_agent(time, [UnitsObserver([FAILED_KUBELET])], policies=[UNIT_START],
                          actuators=Actuators({"host.unit.start": actuator}))
    with capture_logs() as logs:
        await agent.tick()
        await agent.tick()
    assert [e["log_level"] for e in logs if e["event"] == "actuator raised"] == ["error"]
    [failed] = [e for e in logs if e["event"] == "repair.step-failed"]
    assert "RuntimeError: actuator exploded" in failed["reason"]
    assert agent.errors == 0


def test_the_actuator_registry_knows_only_catalog_actions() -> None:
    actuator: Actuator = RecordingActuator(Outcome(ok=True))
    registry = Actuators({"host.unit.start": actuator})
    assert registry.lookup("host.unit.start") is actuator
    with pytest.raises(NoActuatorError, match=r"^no actuator for k8s.node.drain yet$"):
        registry.lookup("k8s.node.drain")
    with pytest.raises(KeyError, match="unknown action"):
        Actuators({"k8s.node.explode": actuator})


# ---------------------------------------------------------------- observing


class Hanging:
    name = "slow"
    provides: frozenset[Domain] = frozenset({"peers"})

    async def observe(self, now: datetime) -> Observed:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")


class Raising:
    name = "broken"
    provides: frozenset[Domain] = frozenset({"leases"})

    async def observe(self, now: datetime) -> Observed:
        raise OSError("no route to host")


class Greedy:
    name = "greedy"
    provides: frozenset[Domain] = frozenset({"leases"})

    async def observe(self, now: datetime) -> Observed:
        return Observed({"units": ()}, SourceStatus(ok=True))


async def test_observers_fill_disjoint_domains_and_failures_stay_unobserved() -> None:
    observing = Observing([UnitsObserver([unit("kubelet.service")]), Hanging(), Raising()],
                          timeout=0, host="cp-1")
    assert observing.unobserved == ("nodes", "pods", "apiserver", "health", "events",
                                    "budgets", "node_report")
    with capture_logs() as logs:
        snapshot = await observing.snapshot(T0)
    assert snapshot.units == (unit("kubelet.service"),)
    assert (snapshot.peers, snapshot.leases, snapshot.nodes) == (None, None, None)
    assert snapshot.sources == {
        "units": SourceStatus(ok=True),
        "slow": SourceStatus(ok=False, detail="timed out after 0s"),
        "broken": SourceStatus(ok=False, detail="OSError: no route to host"),
    }
    assert [e["observer"] for e in logs if e["event"] == "observer failed"] == ["broken"]
    assert snapshot.host == "cp-1"


async def test_an_observer_may_not_fill_another_domain() -> None:
    snapshot = await Observing([Greedy()], timeout=1, host="h").snapshot(T0)
    assert snapshot.units is None
    assert not snapshot.sources["greedy"].ok


def test_two_observers_may_not_share_a_domain() -> None:
    with pytest.raises(ValueError, match="both provide 'units'"):
        Observing([UnitsObserver(), UnitsObserver()], timeout=1)


def test_the_units_watched_are_those_the_policies_name() -> None:
    config = load([REPO / "personas", REPO / "policies"])
    otto = config.persona("otto")
    assert watched_units(config.policies_of(otto)) == (
        "containerd.service", "k3s.service", "kubelet.service")
    names = [o.name for o in host_observers(config.policies_of(otto), config.fleet, REPO,
                                            node="cp-1", explicit_node=False)]
    assert names == ["health", "kubelet", "units", "apiserver"]
    assert [o.name for o in host_observers((), config.fleet, REPO, node="cp-1",
                                           explicit_node=False)] == [
        "health", "kubelet", "apiserver"]


SHOW = """\
NRestarts=3
Id=kubelet.service
LoadState=loaded
ActiveState=failed
SubState=failed

Id=k3s.service
LoadState=not-found
ActiveState=inactive
SubState=dead
NRestarts=0

Id=zeta-agents.target
LoadState=loaded
ActiveState=active
SubState=active
NRestarts=
"""


def test_systemctl_show_output_is_parsed_per_unit() -> None:
    assert parse_show(SHOW) == (
        UnitObs(name="kubelet.service", load_state="loaded", active_state="failed",
                sub_state="failed", n_restarts=3),
        UnitObs(name="k3s.service", load_state="not-found", active_state="inactive",
                sub_state="dead", n_restarts=0),
        UnitObs(name="zeta-agents.target", load_state="loaded", active_state="active",
                sub_state="active", n_restarts=0),
    )


def _script(path: Path, body: str) -> str:
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


async def test_the_unit_observer_runs_systemctl_with_a_strict_argument_list(
        tmp_path: Path) -> None:
    args = tmp_path / "args"
    (tmp_path / "show.txt").write_text(SHOW)
    fake = _script(tmp_path / "systemctl",
                   f'printf "%s\\n" "$@" > {args}\ncat {tmp_path / "show.txt"}\n')
    observed = await UnitObserver(["kubelet.service", "-evil"],
                                  systemctl=Systemctl(fake)).observe(T0)
    assert args.read_text().splitlines() == [
        "show", "--no-pager", "--property=Id,LoadState,ActiveState,SubState,NRestarts", "--",
        "kubelet.service", "-evil"]
    assert observed.data["units"] == parse_show(SHOW)
    assert observed.status == SourceStatus(ok=True, detail="3 units")


async def test_the_unit_observer_reports_a_failing_or_missing_systemctl(
        tmp_path: Path) -> None:
    failing = _script(tmp_path / "systemctl",
                      "echo 'System has not been booted with systemd' >&2\nexit 1\n")
    observed = await UnitObserver(["kubelet.service"], systemctl=Systemctl(failing)).observe(T0)
    show = "show --no-pager --property=Id,LoadState,ActiveState,SubState,NRestarts --"
    assert observed.data == {}
    assert observed.status == SourceStatus(
        ok=False, detail=f"`{failing} {show} kubelet.service`: exit 1: "
                         "System has not been booted with systemd")

    nope = tmp_path / "nope"
    missing = await UnitObserver(["kubelet.service"],
                                 systemctl=Systemctl(str(nope))).observe(T0)
    assert missing.data == {}
    assert missing.status.detail.startswith(f"`{nope} {show} kubelet.service`: cannot run it:")

    slow = _script(tmp_path / "slow", "exec sleep 5\n")
    timed_out = await UnitObserver(["a.service"], systemctl=Systemctl(slow),
                                   timeout=0.05).observe(T0)
    assert timed_out.status == SourceStatus(
        ok=False, detail=f"`{slow} {show} a.service`: no answer within 0.05s")


MEMINFO = "MemTotal:       16000000 kB\nMemFree:  100 kB\nMemAvailable:    4000000 kB\n"
PRESSURE = ("some avg10=1.50 avg60=0.20 avg300=0.00 total=1234\n"
            "full avg10=0.70 avg60=0.00 avg300=0.00 total=99\n")


def test_proc_files_are_parsed() -> None:
    assert parse_meminfo(MEMINFO) == 0.25
    assert parse_meminfo("MemTotal: 10 kB\n") is None
    assert parse_pressure(PRESSURE) == 1.5
    assert parse_pressure("") is None


async def test_the_health_observer_reads_disk_memory_and_pressure(tmp_path: Path) -> None:
    proc = tmp_path / "proc"
    (proc / "pressure").mkdir(parents=True)
    (proc / "meminfo").write_text(MEMINFO)
    (proc / "pressure" / "memory").write_text(PRESSURE)
    observed = await HealthObserver(tmp_path, proc=proc).observe(T0)
    health = observed.data["health"]
    stat_ = os.statvfs(tmp_path)
    assert health.disk_free_fraction == pytest.approx(stat_.f_bavail / stat_.f_blocks, abs=0.01)
    assert (health.memory_available_fraction, health.memory_pressure_some_avg10) == (0.25, 1.5)
    assert observed.status.ok

    (proc / "pressure" / "memory").unlink()  # a kernel without PSI: not a problem
    (proc / "meminfo").write_text("garbage\n")
    observed = await HealthObserver(tmp_path / "gone", proc=proc).observe(T0)
    health = observed.data["health"]
    assert (health.memory_available_fraction, health.memory_pressure_some_avg10) == (None, None)
    assert health.disk_free_fraction is not None  # / could still be read
    assert not observed.status.ok
    assert "statvfs" in observed.status.detail
    assert "meminfo: unexpected format" in observed.status.detail


async def test_apiserver_probes_count_any_http_answer_as_reachable() -> None:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(4096)
        writer.write(b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    closed = await asyncio.start_server(answer, "127.0.0.1", 0)
    closed_port = closed.sockets[0].getsockname()[1]
    closed.close()
    await closed.wait_closed()
    async with server:
        observed = await ApiserverObserver([
            f"http://127.0.0.1:{port}",
            f"https://127.0.0.1:{port}",  # plain HTTP where TLS is expected
            f"https://127.0.0.1:{closed_port}",
            "ftp://nowhere",
        ]).observe(T0)
    probes = observed.data["apiserver"]
    assert [(p.path, p.ok) for p in probes] == [
        (f"tcp 127.0.0.1:{port}", True), (f"readyz http://127.0.0.1:{port}", True),
        (f"tcp 127.0.0.1:{port}", True), (f"readyz https://127.0.0.1:{port}", False),
        (f"tcp 127.0.0.1:{closed_port}", False),
        (f"readyz https://127.0.0.1:{closed_port}", False),
        ("tcp ftp://nowhere", False), ("readyz ftp://nowhere", False),
    ]
    assert probes[3].error.startswith("TLS: ")
    assert probes[4].error == probes[5].error == "Connection refused"
    assert observed.status == SourceStatus(ok=True, detail="3 of 8 paths reachable")


def test_state_directory_comes_from_systemd_or_the_working_directory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    given = tmp_path / "var" / "zeta-agent" / "otto"
    assert state_directory("otto", {"STATE_DIRECTORY": f"{given}:/elsewhere"}) == given
    assert given.is_dir()
    monkeypatch.chdir(tmp_path)
    local = state_directory("vera", {})
    assert local == Path(".zeta-state/vera")
    assert stat.S_IMODE((tmp_path / local).stat().st_mode) == 0o700
