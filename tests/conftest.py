"""Shared fixtures: a scratch copy of the shipped configuration, and clean logging."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from runtime.natsserver import NatsServer

REPO = Path(__file__).resolve().parent.parent


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
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    """A real nats-server with JetStream on a free port, with its own store."""
    with NatsServer(tmp_path / "nats-store") as server:
        yield server
