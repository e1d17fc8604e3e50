"""Shared fixtures: a scratch copy of the shipped configuration, and clean logging."""

from __future__ import annotations

import logging
import shutil
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import structlog
from hypothesis import HealthCheck, settings

from bus.connection import Connection
from bus.jetstream import Settings, ensure
from lab.natsserver import NatsServer
from tests.fleets import api, start_fleet  # noqa: F401
from tests.healthz import healthz  # noqa: F401
from tests.k8s import control_plane, k8s_binaries, k8s_namespace, node_sim  # noqa: F401

REPO = Path(__file__).resolve().parent.parent

# Property tests share two cores with real servers and agent processes: a wall-clock
# deadline per example would turn CPU contention into flaky failures, so none is set.
settings.register_profile("zeta", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("zeta")


@pytest.fixture(autouse=True)
def _fresh_logging() -> Iterator[None]:
    """Undo whatever a test configured: structlog, bound context, stdlib root handlers."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    structlog.reset_defaults()
    structlog.contextvars.clear_contextvars()
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture
def config_copy(tmp_path: Path) -> Path:
    """A config directory holding copies of the shipped personas/ and policies/."""
    target = tmp_path / "config"
    for part in ("personas", "policies"):
        shutil.copytree(REPO / part, target / part)
    return target


@pytest.fixture
def bare_nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    """A real nats-server with JetStream on a free port, with its own store, and nothing in it."""
    with NatsServer(tmp_path / "nats-store") as server:
        yield server


@pytest.fixture
async def nats_server(bare_nats_server: NatsServer) -> NatsServer:
    """``bare_nats_server`` with the audit stream and lease bucket made, as an operator
    makes them once (``zeta-agent bus init``): agents only check them."""
    connection = Connection([bare_nats_server.url], name="operator", seed=None)
    await connection.connect()
    try:
        assert await ensure(connection.js, Settings()) == []
    finally:
        await connection.close()
    return bare_nats_server


@pytest.fixture
async def conn(nats_server: NatsServer) -> AsyncIterator[Connection]:
    """A client of ``nats_server`` with the audit stream and lease bucket created."""
    connection = Connection([nats_server.url], name="test", seed=None)
    await connection.connect()
    assert await ensure(connection.js, Settings()) == []
    yield connection
    await connection.close()
