"""Prometheus metrics of one agent, and the endpoint that serves them (docs/operations.md).

Every agent has a ``Metrics`` with a registry of its own, never prometheus-client's
global one: tests and benchmarks run several agents in one process, and each must
count only itself. Every series carries a ``persona`` label, so series from several
agents on one host (or one Prometheus) never collide.

Counters are incremented and gauges set on the event loop, where the state they
describe changes; the endpoint reads them from its own thread (prometheus-client
metrics are thread-safe), so a scrape never waits for a tick and a stuck event loop
still answers with ``zeta_agent_ticks_total`` standing still. The two values read at
scrape time instead (bus connected, dropped messages) are read with single
GIL-atomic operations, never by iterating live state.

Serving is opt-in (``spec.metrics.listen`` or ``$ZETA_METRICS_LISTEN``): no port is
free on every host, five personas on one host need five addresses, and a listener
is something an operator should ask for. An address that cannot be bound is logged
and the agent runs on without metrics: a repairer blinded by its own monitoring would
be the wrong trade.
"""

from __future__ import annotations

import os
import socketserver
import threading
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import get_args

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import MetricsHandler, start_http_server
from prometheus_client.metrics_core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from bus.envelope import DropReason
from bus.messages import Decision, Verdict
from bus.quorum import Outcome as TallyOutcome
from runtime.core.engine import Finding
from runtime.core.review import CheckName
from runtime.model.formats import Persona, TcpListen, UnixListen, parse_listen

log = structlog.get_logger("metrics")

LISTEN_ENV = "ZETA_METRICS_LISTEN"
"""Overrides ``spec.metrics.listen``; ``off`` turns serving off."""

TICK_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
"""Seconds. A tick's observers are bounded at 5 s and a tick counts as hung at 30 s."""

PROPOSAL_OUTCOMES = (*(o for o in get_args(TallyOutcome) if o != "pending"), "failed")
DECISION_OUTCOMES: tuple[str, ...] = get_args(Decision.model_fields["outcome"].annotation)
MODEL_OUTCOMES = ("ok", "unusable", "failed", "refused")
TOKEN_KINDS = ("input", "output")
EXECUTION_RESULTS = ("succeeded", "failed")
CHECK_RESULTS = ("pass", "block")


class _Dropped(Collector):
    """``Verifier.dropped`` (a Counter by reason, kept by the bus) as a Prometheus counter."""

    def __init__(self, persona: str, counts: Mapping[str, int]) -> None:
        self._persona = persona
        self._counts = counts

    def collect(self) -> Iterable[Metric]:
        family = CounterMetricFamily(
            "zeta_agent_messages_dropped", "Bus messages dropped by the verifier, by reason.",
            labels=("persona", "reason"))
        # dict() of a str-keyed dict copies it in one GIL-held step: the event loop may
        # add a reason meanwhile, which would break an iteration over the live Counter.
        counts = dict(self._counts)
        for reason in dict.fromkeys((*get_args(DropReason), *counts)):
            family.add_metric((self._persona, reason), counts.get(reason, 0))
        yield family


class Metrics:
    """One agent's metrics. Methods are called on the event loop, where things happen."""

    def __init__(self, persona: str, policies: Iterable[str] = ()) -> None:
        self.persona = persona
        self.registry = CollectorRegistry()
        r, p = self.registry, ("persona",)
        self._ticks = Counter("zeta_agent_ticks_total", "Ticks run, failed ones included.",
                              p, registry=r).labels(persona)
        self._tick_errors = Counter("zeta_agent_tick_errors_total",
                                    "Ticks that raised (logged with their traceback).",
                                    p, registry=r).labels(persona)
        self._tick_seconds = Histogram("zeta_agent_tick_duration_seconds",
                                       "Time from the start of a tick to its end.", p,
                                       registry=r, buckets=TICK_BUCKETS).labels(persona)
        self._findings = Gauge("zeta_agent_findings_open", "Findings open now, by policy.",
                               (*p, "policy"), registry=r)
        self._breakers = Gauge("zeta_agent_breaker_tripped",
                               "1 while the policy's breaker is tripped, else 0.",
                               (*p, "policy"), registry=r)
        self._proposals = Counter("zeta_agent_proposals_total",
                                  "This agent's proposals, by how their vote ended.",
                                  (*p, "outcome"), registry=r)
        self._votes = Counter("zeta_agent_votes_total",
                              "Verdicts this agent reached on others' proposals.",
                              (*p, "verdict"), registry=r)
        self._decisions = Counter("zeta_agent_decisions_total",
                                  "Signed decisions seen on the bus (every proposer's).",
                                  (*p, "outcome"), registry=r)
        self._executions = Counter("zeta_agent_executions_total",
                                   "Actions this agent ran, by action and result.",
                                   (*p, "action", "result"), registry=r)
        self._checks = Counter("zeta_agent_review_checks_total",
                               "Review checks this agent ran as a veto holder, by check and "
                               "result (pass, block).", (*p, "check", "result"), registry=r)
        self._disagreements = Counter(
            "zeta_agent_evidence_disagreements_total",
            "Votes this agent rejected because the API server said a node was not Ready and "
            "the node's own agent said its kubelet was healthy.", p, registry=r)
        self._bus = Gauge("zeta_agent_bus_connected", "1 while connected to the bus, else 0.",
                          p, registry=r).labels(persona)
        self._model_calls = Counter("zeta_agent_model_calls_total",
                                    "Requests to the model brain, by outcome.",
                                    (*p, "outcome"), registry=r)
        self._tokens = Counter("zeta_agent_model_tokens_total",
                               "Model tokens spent, by kind (input, output).",
                               (*p, "kind"), registry=r)
        self._paused = Gauge("zeta_agent_paused",
                             "1 while an operator's pause holds the policy's repairs "
                             "(policy=\"*\": every policy).", (*p, "policy"), registry=r)
        self._paused_seen: set[str] = set()
        self._alert_posts = Counter("zeta_agent_alert_posts_total",
                                    "Posts of alerts to a sink (Alertmanager, webhook), by "
                                    "result.", (*p, "sink", "result"), registry=r)
        self._alerts_pending = Gauge("zeta_agent_alerts_pending",
                                     "Alert changes not yet delivered to a sink (spooled).",
                                     (*p, "sink"), registry=r)
        self._alerts_firing = Gauge("zeta_agent_alerts_firing",
                                    "Alerts this agent has firing now.", p,
                                    registry=r).labels(persona)
        # Every known label value starts at 0, so rate() and absent() work from the
        # first scrape, before the first event of each kind.
        for family, values in ((self._proposals, PROPOSAL_OUTCOMES),
                               (self._votes, get_args(Verdict)),
                               (self._decisions, DECISION_OUTCOMES),
                               (self._model_calls, MODEL_OUTCOMES), (self._tokens, TOKEN_KINDS)):
            for value in values:
                family.labels(persona, value)
        for check in get_args(CheckName):
            for result in CHECK_RESULTS:
                self._checks.labels(persona, check, result)
        self._policies: set[str] = set()
        self.engine_state((), (), policies=policies)

    @classmethod
    def of(cls, persona: Persona) -> Metrics:
        """Metrics for ``persona``, with a zero for each of its policies."""
        return cls(persona.name, persona.spec.policies)

    # ------------------------------------------------------------ the agent's tick

    def tick(self, seconds: float, *, failed: bool) -> None:
        self._ticks.inc()
        self._tick_seconds.observe(seconds)
        if failed:
            self._tick_errors.inc()

    def engine_state(self, findings: Iterable[Finding], tripped: Iterable[str], *,
                     policies: Iterable[str] = ()) -> None:
        """Open findings and tripped breakers now; every policy seen so far is reported."""
        open_by_policy: dict[str, int] = {}
        for finding in findings:
            open_by_policy[finding.policy] = open_by_policy.get(finding.policy, 0) + 1
        tripped = set(tripped)
        self._policies |= {*policies, *open_by_policy, *tripped}
        for policy in self._policies:
            self._findings.labels(self.persona, policy).set(open_by_policy.get(policy, 0))
            self._breakers.labels(self.persona, policy).set(int(policy in tripped))

    def execution(self, action: str, *, ok: bool) -> None:
        self._executions.labels(self.persona, action, EXECUTION_RESULTS[not ok]).inc()

    # ------------------------------------------------------------ the quorum

    def proposal(self, outcome: str) -> None:
        """``approved``, ``rejected`` or ``expired`` (the tally), or ``failed`` (the bus)."""
        self._proposals.labels(self.persona, outcome).inc()

    def vote(self, verdict: str) -> None:
        self._votes.labels(self.persona, verdict).inc()

    def review(self, check: CheckName, *, passed: bool) -> None:
        self._checks.labels(self.persona, check, CHECK_RESULTS[not passed]).inc()

    def disagreement(self) -> None:
        self._disagreements.labels(self.persona).inc()

    def decision(self, outcome: str) -> None:
        self._decisions.labels(self.persona, outcome).inc()

    def watch_bus(self, connected: Callable[[], bool], dropped: Mapping[str, int]) -> None:
        """Read the connection state and the verifier's drop counts at every scrape."""
        self._bus.set_function(lambda: float(connected()))
        self.registry.register(_Dropped(self.persona, dropped))

    def paused(self, scopes: Iterable[str]) -> None:
        now = set(scopes)
        self._paused_seen |= now
        for scope in self._paused_seen:
            self._paused.labels(self.persona, scope).set(int(scope in now))

    # ------------------------------------------------------------ alerts

    def alert_post(self, sink: str, *, ok: bool, pending: int) -> None:
        self._alert_posts.labels(self.persona, sink, EXECUTION_RESULTS[not ok]).inc()
        self._alerts_pending.labels(self.persona, sink).set(pending)

    def alerts(self, firing: int, pending: Mapping[str, int]) -> None:
        self._alerts_firing.set(firing)
        for sink, count in pending.items():
            self._alerts_pending.labels(self.persona, sink).set(count)

    # ------------------------------------------------------------ the model brain

    def model_call(self, outcome: str, *, input_tokens: int = 0, output_tokens: int = 0) -> None:
        """One request to the model (``refused``: not sent, no key or budget spent)."""
        self._model_calls.labels(self.persona, outcome).inc()
        self._tokens.labels(self.persona, "input").inc(input_tokens)
        self._tokens.labels(self.persona, "output").inc(output_tokens)


# ---------------------------------------------------------------- the endpoint


class _UnixHTTPServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


class Endpoint:
    """A running metrics endpoint: a server thread, stopped by ``close``."""

    def __init__(self, server: socketserver.BaseServer, thread: threading.Thread,
                 address: str) -> None:
        self._server = server
        self._thread = thread
        self.address = address

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()


def listen_address(persona: Persona, environ: Mapping[str, str] = os.environ
                   ) -> TcpListen | UnixListen | None:
    """Where to serve: ``$ZETA_METRICS_LISTEN`` (``off``: nowhere), else the persona's.

    Raises ``ValueError`` for an unusable override.
    """
    override = environ.get(LISTEN_ENV, "").strip()
    if override == "off":
        return None
    if override:
        return parse_listen(override)
    spec = persona.spec.metrics
    return parse_listen(spec.listen) if spec is not None else None


def serve(metrics: Metrics, listen: TcpListen | UnixListen) -> Endpoint:
    """Serve ``metrics`` in a thread at ``listen``; raises ``OSError`` if it cannot bind."""
    if isinstance(listen, TcpListen):
        server, thread = start_http_server(listen.port, listen.host, registry=metrics.registry)
        return Endpoint(server, thread, str(TcpListen(listen.host, server.server_port)))
    path = Path(listen.path)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    if path.is_socket():
        path.unlink()  # left by a process that was killed; a live agent would own the name
    unix = _UnixHTTPServer(str(path), MetricsHandler.factory(metrics.registry))
    thread = threading.Thread(target=unix.serve_forever, name="metrics", daemon=True)
    thread.start()
    return Endpoint(unix, thread, str(listen))


def start(metrics: Metrics, persona: Persona, environ: Mapping[str, str] = os.environ
          ) -> Endpoint | None:
    """The persona's endpoint, or None when serving is off or failed (logged either way)."""
    try:
        listen = listen_address(persona, environ)
    except ValueError as exc:
        log.error("metrics not served: bad $" + LISTEN_ENV, error=str(exc))
        return None
    if listen is None:
        return None
    try:
        endpoint = serve(metrics, listen)
    except OSError as exc:
        log.error("metrics not served: cannot listen", listen=str(listen), error=str(exc))
        return None
    log.info("metrics served", listen=endpoint.address)
    return endpoint

