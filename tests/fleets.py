"""The five shipped personas as processes on a real API server: the fixtures and waits
the end-to-end tests share (test_e2e_k8s, test_review_fleet)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

import pytest

from lab import fleet as harness
from lab.controlplane import ControlPlane
from lab.fleet import AgentFleet, wait_until
from lab.natsserver import NatsServer
from lab.nodesim import JsonApi
from tests.k8s import admin_json, deployment

REPO = Path(__file__).resolve().parent.parent
NAMES = ("otto", "alexa", "riven", "vera", "lior")
T = TypeVar("T")

FleetStarter = Callable[..., Awaitable[AgentFleet]]


async def until(check: Callable[[], T | None], within: float, what: str) -> T:
    """``lab.fleet.wait_until``, failing the test when it times out."""
    try:
        return await wait_until(check, within, what)
    except TimeoutError as exc:
        pytest.fail(str(exc))


async def eventually(attempt: Callable[[], Awaitable[T | None]], within: float,
                     what: str) -> T:
    """Await ``attempt`` until it returns something, every half second, failing the test
    after ``within`` seconds."""
    deadline = asyncio.get_running_loop().time() + within
    while (result := await attempt()) is None:
        if asyncio.get_running_loop().time() > deadline:
            pytest.fail(f"not within {within:g}s: {what}")
        await asyncio.sleep(0.5)
    return result


@pytest.fixture
async def start_fleet(tmp_path: Path, nats_server: NatsServer,
                      control_plane: ControlPlane) -> AsyncIterator[FleetStarter]:
    """Start the five personas as processes (``policies`` update the harness's POLICIES,
    ``fleet`` the fleet's spec, ``env`` adds to a persona's environment,
    ``extra_policies`` as ``lab.fleet.prepare_fleet``); all stopped after, and each must
    exit 0."""
    started: list[AgentFleet] = []

    async def start(policies: Mapping[str, Mapping[str, Any]] | None = None, *,
                    fleet: Mapping[str, Any] | None = None,
                    env: Mapping[str, Mapping[str, str]] | None = None,
                    extra_policies: Mapping[str, tuple[str, Mapping[str, Any]]] | None = None,
                    ) -> AgentFleet:
        config_dir = harness.prepare_fleet(tmp_path, nats_server.url, control_plane.url,
                                           source=REPO, policies=policies, fleet=fleet,
                                           extra_policies=extra_policies)
        running = await harness.start_fleet(config_dir, tmp_path, nats_server.url,
                                            control_plane, env=env)
        started.append(running)
        await running.wait_ready()
        return running

    yield start
    for running in started:
        codes = await running.stop()
        assert codes == dict.fromkeys(NAMES, 0), f"unclean exits {codes}\n{running.dump()}"


@pytest.fixture
def api(control_plane: ControlPlane) -> Iterator[JsonApi]:
    with admin_json(control_plane) as json_api:
        yield json_api


def node_of(api: JsonApi, name: str) -> dict[str, Any]:
    node: dict[str, Any] = api.call("GET", f"/api/v1/nodes/{name}")
    return node


def create_deployment(api: JsonApi, namespace: str, name: str, replicas: int,
                      pod_spec: dict[str, Any] | None = None) -> None:
    api.call("POST", f"/apis/apps/v1/namespaces/{namespace}/deployments",
             body=deployment(name, replicas, pod_spec=pod_spec))
