"""sd_notify: datagrams to a socket the test binds, and the watchdog interval from the env."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from runtime.host.notify import Notifier, watchdog_interval


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[str, socket.socket]]:
    address = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(address)
        sock.settimeout(1)
        yield address, sock


def test_each_message_is_one_datagram(listener: tuple[str, socket.socket]) -> None:
    address, sock = listener
    notifier = Notifier(address)
    assert notifier.enabled
    assert notifier.ready()
    assert notifier.watchdog()
    assert notifier.stopping()
    assert notifier.notify("STATUS=x", "ERRNO=5")
    assert [sock.recv(4096) for _ in range(4)] == [
        b"READY=1", b"WATCHDOG=1", b"STOPPING=1", b"STATUS=x\nERRNO=5"]


def test_status_stays_one_assignment(listener: tuple[str, socket.socket]) -> None:
    address, sock = listener
    Notifier(address).status("tick 3:\n2 findings\topen ")
    assert sock.recv(4096) == b"STATUS=tick 3: 2 findings open"


def test_abstract_socket_names_start_with_at() -> None:
    name = f"zeta-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(1)
        assert Notifier("@" + name).ready()
        assert sock.recv(4096) == b"READY=1"


def test_without_a_socket_nothing_is_sent() -> None:
    notifier = Notifier.from_env({})
    assert not notifier.enabled
    assert not notifier.ready()
    assert Notifier.from_env({"NOTIFY_SOCKET": ""}).address is None


def test_a_failed_send_is_logged_not_raised(tmp_path: Path) -> None:
    missing = str(tmp_path / "nobody-listens.sock")
    with capture_logs() as logs:
        assert not Notifier.from_env({"NOTIFY_SOCKET": missing}).watchdog()
    assert logs[0]["event"] == "sd_notify failed"
    assert logs[0]["socket"] == missing


@pytest.mark.parametrize(("environ", "expected"), [
    ({}, None),
    ({"WATCHDOG_USEC": "0"}, None),
    ({"WATCHDOG_USEC": "soon"}, None),
    ({"WATCHDOG_USEC": "-5"}, None),
    ({"WATCHDOG_USEC": "400000"}, timedelta(milliseconds=400)),
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "4242"}, timedelta(seconds=30)),
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, None),
])
def test_watchdog_interval(environ: dict[str, str], expected: timedelta | None) -> None:
    assert watchdog_interval(environ, pid=4242) == expected


def test_watchdog_pid_defaults_to_this_process() -> None:
    environ = {"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": str(os.getpid())}
    assert watchdog_interval(environ) == timedelta(seconds=1)
