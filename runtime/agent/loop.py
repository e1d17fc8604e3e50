"""The agent process: one persona, observing, deciding and acting once per tick.

One asyncio process per persona, run by ``zeta-agent run <persona>`` under
``zeta-agent@<persona>.service``. Its root tasks (the tick loop and the watchdog for
now; the bus consumer and the Kubernetes watchers join later) are guarded: the first
one to end for any reason but a stop request stops the others, and the process exits
non-zero so systemd restarts it. A tick that raises is logged and counted, never
fatal.

The systemd contract: ``READY=1`` once the configuration is loaded and the first
observation pass is done; ``WATCHDOG=1`` only while ticks complete; ``STATUS=`` a
one-line summary after every tick; ``STOPPING=1`` on SIGTERM or SIGINT, then an exit
within the grace period.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from runtime.agent.alerting import AgentAlerts
from runtime.agent.deliberating import Deliberator
from runtime.agent.execution import Carried, Execution
from runtime.agent.link import BusLink
from runtime.agent.metrics import Metrics
from runtime.agent.observing import Observing
from runtime.core.alerts import Freeze
from runtime.core.engine import (
    BreakerReset,
    BreakerTripped,
    EngineStatus,
    Event,
    Finding,
    FindingCleared,
    FindingOpened,
    Intent,
    LadderExhausted,
    PolicyEngine,
    RepairVerified,
    StepFailed,
)
from runtime.core.ports import Wall, utc_now
from runtime.host.notify import Notifier
from runtime.model.formats import Persona

log = structlog.get_logger()

CANCEL_AGAIN = 0.2  # seconds between cancellations of a root task that has not stopped yet
DEV_STATE_DIR = Path(".zeta-state")
"""Where state goes outside systemd (``./.zeta-state/<persona>``); under systemd
``StateDirectory=zeta-agent/%i`` sets ``$STATE_DIRECTORY`` instead."""


def state_directory(persona: str, environ: Mapping[str, str] = os.environ) -> Path:
    """The persona's state directory, created if missing (private to its user)."""
    # systemd passes one path per StateDirectory= entry, colon-separated.
    given = environ.get("STATE_DIRECTORY", "").split(":")[0]
    path = Path(given) if given else DEV_STATE_DIR / persona
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


@dataclass(frozen=True)
class Timing:
    """How often and how long, in seconds of the monotonic clock."""

    tick: float
    observe_timeout: float = 5.0
    # A tick still running this long after it started counts as hung: the watchdog
    # stops pinging and systemd restarts the process. Observers are bounded well
    # below it, so only a genuinely stuck tick gets there.
    tick_timeout: float = 30.0
    # How long root tasks get to finish after being cancelled on the way out.
    grace: float = 3.0
    # Half of systemd's WatchdogSec (WATCHDOG_USEC), or None without a watchdog.
    watchdog: float | None = None


@dataclass
class TickReport:
    """What one tick did: the fields of its canonical log line."""

    tick: int
    findings_open: int = 0
    intents: int = 0
    holds: int = 0
    refused: int = 0
    started: int = 0
    failed: int = 0
    sources_down: list[str] = field(default_factory=list)
    k8s: str = "not observed"


@dataclass(frozen=True)
class Exit:
    """How the root tasks ended: the process exit code, and tasks that would not stop."""

    code: int
    abandoned: tuple[str, ...] = ()


async def supervise(roots: Mapping[str, Coroutine[Any, Any, None]], stop: asyncio.Event, *,
                    grace: float) -> Exit:
    """Run root tasks until ``stop`` is set (exit 0) or one of them ends (exit 1).

    Root tasks are meant to run forever, so one that returns is as wrong as one that
    raises. The others are cancelled and given ``grace`` seconds; any still running
    then are reported as abandoned.
    """
    tasks = {asyncio.create_task(coro, name=name): name for name, coro in roots.items()}
    stopper = asyncio.create_task(stop.wait(), name="stop")
    try:
        await asyncio.wait([*tasks, stopper], return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopper.cancel()
        ended = {task for task in tasks if task.done()}
        for task in tasks:
            task.cancel()
    for task in ended:
        error = None if task.cancelled() else task.exception()
        log.error("root task ended", task=tasks[task],
                  error=repr(error) if error else "returned or was cancelled", exc_info=error)
    pending = {task for task in tasks if task not in ended}
    deadline = asyncio.get_running_loop().time() + grace
    while pending and (left := deadline - asyncio.get_running_loop().time()) > 0:
        _, pending = await asyncio.wait(pending, timeout=min(left, CANCEL_AGAIN))
        # Some libraries swallow a CancelledError (nats-py does while it flushes a
        # publish); cancelling again gets such a task out instead of abandoning it.
        for task in pending:
            task.cancel()
    for task, name in tasks.items():
        if task not in ended and task.done() and not task.cancelled() and task.exception():
            log.error("root task failed while stopping", task=name, exc_info=task.exception())
    abandoned = tuple(sorted(tasks[task] for task in pending))
    if abandoned:
        log.error("root tasks ignored cancellation", tasks=abandoned, grace_s=grace)
    code = 1 if ended else 0
    return Exit(code, abandoned)


def _plural(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


class Agent:
    """One persona's tick loop and watchdog, with every collaborator injected."""

    def __init__(self, persona: Persona, *, engine: PolicyEngine, observing: Observing,
                 execution: Execution, notifier: Notifier, timing: Timing, metrics: Metrics,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
                 wall: Wall = utc_now,
                 link: BusLink | None = None,
                 deliberator: Deliberator | None = None,
                 alerts: AgentAlerts | None = None) -> None:
        self.persona = persona
        self.alerts = alerts
        self.metrics = metrics
        self.link = link
        self.deliberator = deliberator
        self.engine = engine
        self.observing = observing
        self.execution = execution
        self.notifier = notifier
        self.timing = timing
        self._clock, self._sleep, self._wall = clock, sleep, wall
        self.ticks = 0
        self.errors = 0
        self.ready = False
        self._last_tick_done = clock()
        self._stalled = False
        self._holds: dict[tuple[str, str], str] = {}

    # ------------------------------------------------------------ lifecycle

    async def run(self, stop: asyncio.Event) -> Exit:
        """Tick (and feed the watchdog) until ``stop`` is set or a root task dies."""
        # Each agent's tasks carry its own persona in their log context (several agents
        # can share one process in tests and benchmarks).
        structlog.contextvars.bind_contextvars(persona=self.persona.name)
        self.notifier.status("starting: first observation pass")
        roots: dict[str, Coroutine[Any, Any, None]] = {"tick-loop": self._tick_loop()}
        if self.timing.watchdog is not None:
            roots["watchdog"] = self._watchdog(self.timing.watchdog)
        if self.link is not None:
            roots["bus"] = self.link.run()
        if self.alerts is not None:
            roots["alerts"] = self.alerts.alerter.run()
        try:
            return await supervise(roots, stop, grace=self.timing.grace)
        finally:
            if self.deliberator is not None:
                self.deliberator.close()
            await self.execution.close()
            if self.link is not None:
                await self.link.close()

    async def run_once(self) -> int:
        """One tick, for operators and tests: 0 if it completed, 1 if it raised."""
        errors = self.errors
        await self.tick()
        return 0 if self.errors == errors else 1

    def advancing(self) -> bool:
        """True while ticks complete on time: the only condition for ``WATCHDOG=1``."""
        late = self._clock() - self._last_tick_done
        return late <= self.timing.tick + self.timing.tick_timeout

    async def _tick_loop(self) -> None:
        due = self._clock()
        while True:
            await self.tick()
            # Ticks are due on a fixed grid; after an overrun the next one starts at
            # once rather than in a burst that catches up.
            due = max(due + self.timing.tick, self._clock())
            await self._sleep(due - self._clock())

    async def _watchdog(self, period: float) -> None:
        while True:
            await self._sleep(period)
            if self.advancing():
                if self._stalled:
                    log.info("tick loop advancing again; watchdog pings resume")
                self._stalled = False
                self.notifier.watchdog()
            elif not self._stalled:
                self._stalled = True
                log.error("tick loop stalled; withholding watchdog pings so systemd "
                          "restarts the agent", last_tick=self.ticks,
                          stalled_s=round(self._clock() - self._last_tick_done, 3))

    # ------------------------------------------------------------ one tick

    async def tick(self) -> None:
        """Observe, evaluate, act; log the canonical line and update ``STATUS=``.

        Exceptions are logged with their traceback and counted, never raised.
        """
        self.ticks += 1
        report = TickReport(tick=self.ticks)
        structlog.contextvars.bind_contextvars(tick=self.ticks)
        started = self._clock()
        error: Exception | None = None
        try:
            await self._tick(report)
        except Exception as exc:
            error = exc
            self.errors += 1
        self._last_tick_done = self._clock()
        engine_status = self.engine.status()
        self.metrics.tick(self._last_tick_done - started, failed=error is not None)
        self.metrics.engine_state(self.engine.open_findings(), engine_status.breakers)
        self.metrics.paused(h.scope for h in self.execution.holds())
        fields = {**vars(report), "duration_ms": round((self._last_tick_done - started) * 1000),
                  "errors": int(error is not None), "errors_total": self.errors}
        if error is None:
            log.info("tick", **fields)
        else:
            log.error("tick", **fields, exc_info=error)
        status = self._status_line(report, engine_status, error)
        self.notifier.status(status)
        if self.link is not None:
            self.link.report(ticks=self.ticks, status=status, kubernetes=report.k8s)

    async def _tick(self, report: TickReport) -> None:
        snapshot = await self.observing.snapshot(self._wall())
        if self.link is not None:
            self.link.report_node(snapshot.node_report)
        report.sources_down = sorted(n for n, s in snapshot.sources.items() if not s.ok)
        kubernetes = snapshot.sources.get("kubernetes")
        if snapshot.nodes is not None or snapshot.pods is not None:
            report.k8s = "observed"
        elif kubernetes is not None and not kubernetes.ok:
            report.k8s = f"unreachable: {kubernetes.detail[:200]}"
        if not self.ready:
            self.ready = True
            self.notifier.ready()
            log.info("ready", sources={n: s.detail for n, s in snapshot.sources.items()})
        evaluation = self.engine.evaluate(snapshot)
        for event in evaluation.events:
            _log_event(event)
        if self.link is not None:
            await self.link.publish_findings(evaluation.events)
        if self.alerts is not None:  # before the execution concludes (forgets) the repairs
            self.alerts.events(evaluation.events, self.execution.repair_of)
        await self.execution.on_events(evaluation.events)
        report.findings_open = len(evaluation.findings)
        report.intents = len(evaluation.intents)
        report.holds = len(evaluation.holds)
        holds = {(h.policy, h.target.key): h for h in evaluation.holds}
        for key, hold in holds.items():
            # Holds repeat every tick while they last; say each one when it changes.
            if self._holds.get(key) != hold.reason:
                log.info("intent held", policy=hold.policy, target=hold.target.key,
                         step=hold.step, reason=hold.reason)
        self._holds = {key: hold.reason for key, hold in holds.items()}
        # A model brain holds new intents back while it deliberates (never awaited
        # here) and hands them, or its picks, to a later tick.
        intents = (evaluation.intents if self.deliberator is None
                   else self.deliberator.decide(evaluation, snapshot))
        for intent in intents:
            await self._carry_out(intent, report)
        if self.alerts is not None:
            self._alert(evaluation.findings)

    def _alert(self, findings: tuple[Finding, ...]) -> None:
        view = self.link.view if self.link is not None else None
        frozen = view.frozen if view is not None else None
        heard = ({n: p.last_heartbeat for n, p in view.peers.items()
                  if p.last_heartbeat is not None} if view is not None else {})
        assert self.alerts is not None
        self.alerts.tick(findings=findings, breakers=self.engine.status().breakers,
                         freeze=Freeze("an operator", frozen.reason) if frozen else None,
                         heard=heard, now=self._wall(), paused=self.execution.holds())

    async def _carry_out(self, intent: Intent, report: TickReport) -> None:
        carried: Carried = await self.execution.carry_out(intent)
        if self.alerts is not None:
            self.alerts.carried(intent, carried, self.execution.repair_of(intent.id))
        if carried == "left":
            report.holds += 1
        elif carried == "refused":
            report.refused += 1
        else:
            report.started += 1
            report.failed += carried == "failed"

    def _status_line(self, report: TickReport, status: EngineStatus,
                     error: Exception | None) -> str:
        head = (f"tick {report.tick}" if error is None
                else f"tick {report.tick} failed ({type(error).__name__})")
        bus = self.link.view.describe() if self.link is not None else "bus: disabled"
        parts = [f"{head}: {_plural(status.open_findings, 'finding')} open",
                 f"{status.in_flight} in flight", bus, f"k8s: {report.k8s}"]
        if self.deliberator is not None:
            parts.append(self.deliberator.status)
        if status.breakers:
            parts.append(f"breaker tripped: {','.join(status.breakers)}")
        if self.errors:
            parts.append(_plural(self.errors, "tick error"))
        return ", ".join(parts)


def _log_event(event: Event) -> None:
    match event:
        case FindingOpened(finding=finding) | FindingCleared(finding=finding):
            (log.warning if isinstance(event, FindingOpened) else log.info)(
                event.kind, policy=finding.policy, target=finding.target.key,
                summary=finding.summary, since=finding.since.isoformat())
        case LadderExhausted(finding=finding, cooldown_until=until):
            log.warning(event.kind, policy=finding.policy, target=finding.target.key,
                        cooldown_until=until.isoformat())
        case RepairVerified(intent=intent):
            log.info(event.kind, intent=intent.id, target=intent.target.key)
        case StepFailed(intent=intent, reason=reason):
            log.warning(event.kind, intent=intent.id, target=intent.target.key, reason=reason)
        case BreakerTripped():
            log.error(event.kind, policy=event.policy, reason=event.reason)
        case BreakerReset(policy=policy, by=by):
            log.info(event.kind, policy=policy, by=by)


# ---------------------------------------------------------------- the process
