"""Prometheus metrics: each family moves when what it counts happens, and a real agent serves them.

The agent, coordinator and brain are driven the way their own tests drive them (fake
time, the recorded incident, the fake Messages API, five agents on a real
nats-server); what is asserted is what a scrape of that agent's registry shows.
"""

from __future__ import annotations

import asyncio
import http.client
import signal
import socket
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath

import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError
from structlog.testing import capture_logs

from bus.envelope import seal
from bus.keys import Signer, generate_user_seed
from bus.messages import Proposal, QuorumRule, Target
from lab.natsserver import free_ports
from runtime.agent.metrics import Endpoint, Metrics, listen_address, serve, start
from runtime.brain.asking import BrainUnavailableError
from runtime.config.loading import ConfigSet, config_paths, load
from runtime.core.ports import Actuators, Outcome
from runtime.model.formats import Persona, TcpListen, UnixListen, parse_listen
from runtime.ops.render.units import render_unit
from tests.builders import RecordingActuator, policy, unconnected_bus, unit
from tests.messages_api import Error, MessagesApi, messages_api_server, reply, text
from tests.test_agent import (
    FAILED_KUBELET,
    OTTO,
    UNIT_START,
    FakeTime,
    FlakyEngine,
    UnitsObserver,
    make_agent,
)
from tests.test_agent_process import _agent, fast_otto  # noqa: F401
from tests.test_brain import CORDON_WORKER_1, incident, situation, thinker
from tests.test_fleet_quorum import Fleet, _run, fleet  # noqa: F401

REPO = Path(__file__).resolve().parent.parent
messages_api = pytest.fixture(messages_api_server)


def value(metrics: Metrics, name: str, **labels: str) -> float:
    """One sample of ``metrics`` (the persona label is implied); 0 if absent, as in PromQL."""
    found = metrics.registry.get_sample_value(name, {"persona": metrics.persona, **labels})
    return 0.0 if found is None else found


@pytest.fixture(scope="module")
def shipped() -> ConfigSet:
    return load(config_paths(REPO))


# ---------------------------------------------------------------- the tick


async def test_every_tick_is_counted_timed_and_failures_counted_apart() -> None:
    time_ = FakeTime()
    engine = FlakyEngine([UNIT_START])
    agent, _ = make_agent(time_, [UnitsObserver([unit("kubelet.service")])], engine=engine)
    await agent.tick()
    engine.broken = True
    await agent.tick()
    engine.broken = False
    await agent.tick()
    m = agent.metrics
    assert value(m, "zeta_agent_ticks_total") == 3
    assert value(m, "zeta_agent_tick_errors_total") == 1
    assert value(m, "zeta_agent_tick_duration_seconds_count") == 3


async def test_tick_duration_is_the_time_the_tick_took() -> None:
    time_ = FakeTime()
    observer = UnitsObserver()
    agent, _ = make_agent(time_, [observer])
    observer.hang = True
    ticking = asyncio.create_task(agent.tick())
    await time_.advance(0.3)  # the observation takes 0.3 s of the fake clock
    observer.release.set()
    await ticking
    m = agent.metrics
    assert value(m, "zeta_agent_tick_duration_seconds_sum") == pytest.approx(0.3)
    assert value(m, "zeta_agent_tick_duration_seconds_bucket", le="0.25") == 0
    assert value(m, "zeta_agent_tick_duration_seconds_bucket", le="0.5") == 1


async def test_open_findings_are_counted_by_policy_and_drop_back_to_zero() -> None:
    time_ = FakeTime()
    observer = UnitsObserver([FAILED_KUBELET])
    agent, _ = make_agent(time_, [observer], policies=[UNIT_START])
    assert value(agent.metrics, "zeta_agent_findings_open", policy="kubelet-down") == 0
    await agent.tick()
    assert value(agent.metrics, "zeta_agent_findings_open", policy="kubelet-down") == 1
    observer.units = (unit("kubelet.service"),)
    await agent.tick()
    assert agent.metrics.registry.get_sample_value(
        "zeta_agent_findings_open", {"persona": "otto", "policy": "kubelet-down"}) == 0


async def test_a_tripped_breaker_is_one_until_reset() -> None:
    storm = policy("units-down", {"kind": "unit-failed", "units": ["a.service", "b.service"]},
                   [{"action": "host.unit.start", "params": {"unit": "a.service"}}],
                   budget={"maxUnhealthyFraction": 0.4})
    time_ = FakeTime()
    observer = UnitsObserver([unit("a.service", "failed"), unit("b.service", "failed")])
    agent, _ = make_agent(time_, [observer], policies=[storm])
    await agent.tick()
    assert value(agent.metrics, "zeta_agent_breaker_tripped", policy="units-down") == 1
    assert agent.engine.reset_breaker("units-down", by="op", at=time_.wall())
    await agent.tick()
    # Still unhealthy: the engine trips it again at once; the gauge follows the engine.
    assert value(agent.metrics, "zeta_agent_breaker_tripped", policy="units-down") == 1
    observer.units = (unit("a.service"), unit("b.service"))
    assert agent.engine.reset_breaker("units-down", by="op", at=time_.wall())
    await agent.tick()
    assert agent.metrics.registry.get_sample_value(
        "zeta_agent_breaker_tripped", {"persona": "otto", "policy": "units-down"}) == 0


@pytest.mark.parametrize(("outcome", "result"), [(Outcome(ok=True), "succeeded"),
                                                 (None, "failed")])
async def test_an_execution_is_counted_by_action_and_result(outcome: Outcome | None,
                                                            result: str) -> None:
    time_ = FakeTime()
    actuator = RecordingActuator(outcome)  # None: the actuator raises
    agent, _ = make_agent(time_, [UnitsObserver([FAILED_KUBELET])], policies=[UNIT_START],
                          actuators=Actuators({"host.unit.start": actuator}))
    await agent.tick()
    assert value(agent.metrics, "zeta_agent_executions_total", action="host.unit.start",
                 result=result) == 1
    assert sum(s.value for f in agent.metrics.registry.collect()
               if f.name == "zeta_agent_executions" for s in f.samples
               if s.name.endswith("_total")) == 1


# ---------------------------------------------------------------- the bus


def test_a_bus_link_not_connected_reports_zero(shipped: ConfigSet) -> None:
    assert value(unconnected_bus(shipped, "alexa")[0].metrics, "zeta_agent_bus_connected") == 0


def test_an_agent_without_a_bus_reports_it_disconnected() -> None:
    agent, _ = make_agent(FakeTime(), [])
    assert agent.link is None
    assert value(agent.metrics, "zeta_agent_bus_connected") == 0


def test_dropped_messages_are_counted_by_reason(shipped: ConfigSet) -> None:
    made, _ = unconnected_bus(shipped, "alexa")
    assert value(made.metrics, "zeta_agent_messages_dropped_total", reason="not-json") == 0
    made.verifier.check("zeta.agent.otto.heartbeat", b"{not json")
    made.verifier.check("zeta.agent.otto.heartbeat", b"{not json")
    made.verifier.check("zeta.agent.otto.heartbeat", b"[]")
    assert value(made.metrics, "zeta_agent_messages_dropped_total", reason="not-json") == 2
    assert value(made.metrics, "zeta_agent_messages_dropped_total", reason="malformed") == 1
    assert value(made.metrics, "zeta_agent_messages_dropped_total", reason="stale") == 0


async def test_a_vote_is_counted_by_its_verdict(shipped: ConfigSet) -> None:
    _, riven = unconnected_bus(shipped, "riven")  # a veto holder: her objections are blocks
    proposal = Proposal(
        action="k8s.node.cordon", target=Target(kind="node", name="worker-1"), params={},
        policy="no-such-policy", policy_digest="d", step=0, destructive=False,
        summary="s", quorum=QuorumRule(approvals=2, veto=(), deadline=datetime.now(UTC)))
    envelope = seal("proposal", sender="otto", host="cp-1", body=proposal,
                    signer=Signer(generate_user_seed()), repair="01jd0000000000000000000000")
    judgement = await riven.assess(envelope, proposal)
    assert judgement.verdict == "block"
    assert value(riven.metrics, "zeta_agent_votes_total", verdict="block") == 1
    assert value(riven.metrics, "zeta_agent_votes_total", verdict="approve") == 0


async def test_proposals_decisions_and_quorum_executions_are_counted(fleet: Fleet) -> None:  # noqa: F811
    await _run(fleet, lambda: bool(fleet.actuator.runs) and all(
        value(a.metrics, "zeta_agent_decisions_total", outcome="approved") == 1
        for a in fleet.agents.values()))
    otto = fleet.agents["otto"].metrics
    assert value(otto, "zeta_agent_proposals_total", outcome="approved") == 1
    assert value(otto, "zeta_agent_proposals_total", outcome="rejected") == 0
    assert value(otto, "zeta_agent_executions_total", action="host.unit.restart",
                 result="succeeded") == 1
    alexa = fleet.agents["alexa"].metrics
    assert value(alexa, "zeta_agent_votes_total", verdict="approve") == 1
    assert value(alexa, "zeta_agent_proposals_total", outcome="approved") == 0
    # The agents have stopped and closed their connections.
    assert value(otto, "zeta_agent_bus_connected") == 0


async def test_a_vetoed_proposal_is_counted_as_rejected(fleet: Fleet) -> None:  # noqa: F811
    fleet.sees_the_api("riven")
    otto = fleet.agents["otto"].metrics
    await _run(fleet, lambda: value(otto, "zeta_agent_proposals_total", outcome="rejected") >= 1)
    assert value(fleet.agents["riven"].metrics, "zeta_agent_votes_total", verdict="block") >= 1
    assert value(otto, "zeta_agent_decisions_total", outcome="rejected") >= 1
    assert value(otto, "zeta_agent_executions_total", action="host.unit.restart",
                 result="succeeded") == 0


async def test_a_connected_agent_says_so(fleet: Fleet) -> None:  # noqa: F811
    otto = fleet.agents["otto"].metrics
    await _run(fleet, lambda: value(otto, "zeta_agent_bus_connected") == 1)


# ---------------------------------------------------------------- the model brain


@pytest.fixture(scope="module")
def config() -> ConfigSet:
    return load(config_paths(REPO))


async def test_model_calls_are_counted_by_outcome_with_their_tokens(
        config: ConfigSet, tmp_path: Path, messages_api: MessagesApi) -> None:
    made = thinker(config, messages_api, tmp_path, retries=0)
    m = made.metrics
    pending, evaluation = situation(made, incident())
    messages_api.answer(reply(CORDON_WORKER_1, input_tokens=950, output_tokens=60))
    await made.think(pending, evaluation.findings, incident())
    assert value(m, "zeta_agent_model_calls_total", outcome="ok") == 1
    assert value(m, "zeta_agent_model_tokens_total", kind="input") == 950
    assert value(m, "zeta_agent_model_tokens_total", kind="output") == 60

    messages_api.answer(reply(text("no."), stop_reason="refusal", input_tokens=10,
                              output_tokens=2), Error(500))
    for reason in ("the model refused", "server error 500"):
        with pytest.raises(BrainUnavailableError, match=reason):
            await made.think(pending, evaluation.findings, incident())
    assert value(m, "zeta_agent_model_calls_total", outcome="unusable") == 1
    assert value(m, "zeta_agent_model_calls_total", outcome="failed") == 1
    assert value(m, "zeta_agent_model_tokens_total", kind="input") == 960
    assert value(m, "zeta_agent_model_tokens_total", kind="output") == 62


async def test_a_call_not_made_is_counted_as_refused(
        config: ConfigSet, tmp_path: Path, messages_api: MessagesApi) -> None:
    made = thinker(config, messages_api, tmp_path, key=None)
    pending, evaluation = situation(made, incident())
    with pytest.raises(BrainUnavailableError, match="no API key"):
        await made.think(pending, evaluation.findings, incident())
    assert value(made.metrics, "zeta_agent_model_calls_total", outcome="refused") == 1
    assert value(made.metrics, "zeta_agent_model_calls_total", outcome="ok") == 0


# ---------------------------------------------------------------- where they are served


@pytest.mark.parametrize(("text_", "parsed"), [
    ("127.0.0.1:9464", TcpListen("127.0.0.1", 9464)),
    ("127.0.0.2:0", TcpListen("127.0.0.2", 0)),
    ("[::1]:9464", TcpListen("::1", 9464)),
    ("unix:/run/zeta-agent/otto/metrics.sock",
     UnixListen(PurePosixPath("/run/zeta-agent/otto/metrics.sock"))),
])
def test_listen_addresses_parse(text_: str, parsed: TcpListen | UnixListen) -> None:
    assert parse_listen(text_) == parsed
    assert str(parsed) == text_


@pytest.mark.parametrize(("text_", "error"), [
    ("0.0.0.0:9464", "not a loopback address"),
    ("10.0.0.1:9464", "not a loopback address"),
    ("localhost:9464", "not an IP address"),
    ("127.0.0.1", "neither IP:PORT nor unix:/PATH"),
    ("127.0.0.1:99999", "neither IP:PORT nor unix:/PATH"),
    ("unix:metrics.sock", "must be absolute"),
    ("unix:/" + "x" * 120, "at most 107 bytes"),
])
def test_unusable_listen_addresses_are_refused(text_: str, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        parse_listen(text_)


def with_metrics(persona: Persona, listen: str) -> Persona:
    data = persona.model_dump(by_alias=True, mode="json", exclude_none=True)
    data["spec"]["metrics"] = {"listen": listen}
    return Persona.model_validate(data)


def test_a_persona_file_refuses_a_public_metrics_address() -> None:
    with pytest.raises(ValidationError, match="is not a loopback address"):
        with_metrics(OTTO, "0.0.0.0:9464")


def test_the_environment_overrides_the_persona_file() -> None:
    otto = with_metrics(OTTO, "127.0.0.1:9464")
    assert listen_address(OTTO, {}) is None, "no metrics unless asked for"
    assert listen_address(otto, {}) == TcpListen("127.0.0.1", 9464)
    assert listen_address(otto, {"ZETA_METRICS_LISTEN": "127.0.0.1:9500"}) == TcpListen(
        "127.0.0.1", 9500)
    assert listen_address(otto, {"ZETA_METRICS_LISTEN": "off"}) is None


def _get(connect: socket.socket | tuple[str, int]) -> str:
    """GET /metrics over TCP (host, port) or an already connected unix socket."""
    if isinstance(connect, tuple):
        client = http.client.HTTPConnection(*connect, timeout=10)
    else:
        client = http.client.HTTPConnection("localhost", timeout=10)
        client.sock = connect
    try:
        client.request("GET", "/metrics")
        response = client.getresponse()
        assert response.status == 200
        return response.read().decode()
    finally:
        client.close()


def _families(text_: str) -> dict[str, float]:
    return {f"{s.name}{sorted(s.labels.items())}": s.value
            for family in text_string_to_metric_families(text_) for s in family.samples}


@pytest.fixture
def endpoints() -> Iterator[list[Endpoint]]:
    started: list[Endpoint] = []
    yield started
    for endpoint in started:
        endpoint.close()


def test_metrics_are_served_on_a_loopback_port(endpoints: list[Endpoint]) -> None:
    metrics = Metrics("otto", ["kubelet-down"])
    metrics.tick(0.01, failed=False)
    endpoint = serve(metrics, TcpListen("127.0.0.1", 0))
    endpoints.append(endpoint)
    host, _, port = endpoint.address.rpartition(":")
    scraped = _families(_get((host, int(port))))
    assert scraped["zeta_agent_ticks_total[('persona', 'otto')]"] == 1
    assert scraped["zeta_agent_findings_open[('persona', 'otto'), ('policy', 'kubelet-down')]"] == 0


def test_metrics_are_served_on_a_unix_socket(tmp_path: Path, endpoints: list[Endpoint]) -> None:
    path = tmp_path / "run" / "metrics.sock"
    path.parent.mkdir()
    stale = socket.socket(socket.AF_UNIX)  # a socket file left by a killed agent
    stale.bind(str(path))
    stale.close()
    metrics = Metrics("vera")
    endpoints.append(serve(metrics, UnixListen(PurePosixPath(path))))
    conn = socket.socket(socket.AF_UNIX)
    conn.connect(str(path))
    assert _families(_get(conn))["zeta_agent_ticks_total[('persona', 'vera')]"] == 0


def test_an_address_in_use_leaves_the_agent_running_without_metrics(
        endpoints: list[Endpoint]) -> None:
    taken = Metrics("otto")
    endpoint = serve(taken, TcpListen("127.0.0.1", 0))
    endpoints.append(endpoint)
    otto = with_metrics(OTTO, endpoint.address)
    with capture_logs() as logs:
        assert start(Metrics("otto"), otto, {}) is None
        assert start(Metrics("otto"), otto, {"ZETA_METRICS_LISTEN": "nowhere"}) is None
    assert [e["event"] for e in logs] == ["metrics not served: cannot listen",
                                          "metrics not served: bad $ZETA_METRICS_LISTEN"]


def test_a_socket_persona_gets_a_runtime_directory_in_its_drop_in(shipped: ConfigSet) -> None:
    otto = shipped.persona("otto")
    directives = "RuntimeDirectory=zeta-agent/otto\nRuntimeDirectoryMode=0700\n"

    def drop_in(persona: Persona) -> str:
        return render_unit(persona, credentials_dir=Path("/nonexistent"), source="test")

    assert "RuntimeDirectory=" not in drop_in(otto)
    assert "RuntimeDirectory=" not in drop_in(with_metrics(otto, "127.0.0.1:9464"))
    inside = drop_in(with_metrics(otto, "unix:/run/zeta-agent/otto/metrics.sock"))
    assert inside.endswith(directives)
    assert "is not in" not in inside
    elsewhere = drop_in(with_metrics(otto, "unix:/run/otto.sock"))
    assert "/run/otto.sock is not in /run/zeta-agent/otto/" in elsewhere


# ---------------------------------------------------------------- a real agent process


@pytest.mark.slow
def test_a_running_agent_serves_its_metrics_over_http(fast_otto: Path,  # noqa: F811
                                                      tmp_path: Path) -> None:
    [port] = free_ports(1)
    agent = _agent(fast_otto, tmp_path, ZETA_METRICS_LISTEN=f"127.0.0.1:{port}")
    ticks: list[float] = []
    try:
        deadline = time.monotonic() + 30
        while len(set(ticks)) < 3 and time.monotonic() < deadline:
            assert agent.poll() is None, agent.communicate()
            try:
                scraped = _get(("127.0.0.1", port))
            except OSError:  # not listening yet
                time.sleep(0.2)
                continue
            families = {f.name: f for f in text_string_to_metric_families(scraped)}
            ticks.append(families["zeta_agent_ticks"].samples[0].value)
            [connected] = families["zeta_agent_bus_connected"].samples
            assert (connected.labels, connected.value) == ({"persona": "otto"}, 0.0)
            assert "zeta_agent_tick_duration_seconds" in families
            time.sleep(0.5)
        agent.send_signal(signal.SIGTERM)
        assert agent.wait(timeout=10) == 0
    finally:
        if agent.poll() is None:
            agent.kill()
        out, err = agent.communicate()
    assert len(set(ticks)) >= 3, (ticks, err)
    assert ticks == sorted(ticks), "ticks_total never goes down"
    assert f'"listen": "127.0.0.1:{port}"' in out
    assert "Traceback" not in err


def test_metrics_are_not_served_by_default(shipped: ConfigSet) -> None:
    assert all(p.value.spec.metrics is None for p in shipped.personas.values())
    assert listen_address(shipped.persona("otto"), {}) is None
