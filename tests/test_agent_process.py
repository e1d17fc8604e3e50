"""``zeta-agent run`` as a real process, speaking sd_notify to a socket the test reads.

The test plays systemd: it binds the ``NOTIFY_SOCKET``, sets ``WATCHDOG_USEC``, and
sends SIGTERM, as ``systemctl stop`` would.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def _agent(config: Path, tmp_path: Path, **env: str) -> subprocess.Popen[str]:
    environ = {k: v for k, v in os.environ.items()
               if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "ZETA_CONFIG_DIR")}
    environ.update(STATE_DIRECTORY=str(tmp_path / "state"), **env)
    return subprocess.Popen(
        [sys.executable, "-m", "runtime", "run", "otto", "--config-dir", str(config)],
        cwd=REPO, env=environ, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)


class NotifySocket:
    """The systemd side of sd_notify: every assignment received, in order."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.messages: list[str] = []

    def wait_for(self, done: Callable[[list[str]], bool], timeout: float) -> list[str]:
        deadline = time.monotonic() + timeout
        while not done(self.messages):
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"timed out; received so far: {self.messages}")
            self.sock.settimeout(left)
            try:
                self.messages.extend(self.sock.recv(4096).decode().split("\n"))
            except TimeoutError:
                continue
        return self.messages


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[NotifySocket]:
    listener = NotifySocket(tmp_path / "notify.sock")
    yield listener
    listener.sock.close()


@pytest.fixture
def fast_otto(config_copy: Path) -> Path:
    otto = config_copy / "personas" / "otto.yaml"
    otto.write_text(otto.read_text().replace("tick: 15s", "tick: 1s"))
    return config_copy


def _after(messages: list[str], first: str) -> list[str]:
    return messages[messages.index(first) + 1:] if first in messages else []


def test_run_otto_speaks_sd_notify_and_stops_on_sigterm(
        fast_otto: Path, notify: NotifySocket, tmp_path: Path) -> None:
    agent = _agent(fast_otto, tmp_path, NOTIFY_SOCKET=str(notify.path), WATCHDOG_USEC="400000")
    try:
        notify.wait_for(lambda m: "READY=1" in m, timeout=15)
        messages = notify.wait_for(
            lambda m: _after(m, "READY=1").count("WATCHDOG=1") >= 2
            and any(s.startswith("STATUS=tick 2:") for s in m), timeout=10)
        agent.send_signal(signal.SIGTERM)
        messages = notify.wait_for(lambda m: "STOPPING=1" in m, timeout=5)
        assert agent.wait(timeout=5) == 0
    finally:
        if agent.poll() is None:
            agent.kill()
        out, err = agent.communicate()

    assert messages[0] == "STATUS=starting: first observation pass"
    statuses = [m for m in messages if m.startswith("STATUS=tick")]
    assert statuses[0] == ("STATUS=tick 1: 0 findings open, 0 in flight, bus: disabled, "
                           "k8s: not observed")
    assert messages.index("READY=1") < messages.index(statuses[0])
    assert messages.index("STOPPING=1") > messages.index("READY=1")
    assert "Traceback" not in err
    events = [json.loads(line) for line in out.splitlines()]  # JSON: stdout is not a TTY
    assert {e["persona"] for e in events} == {"otto"}
    ticks = [e for e in events if e["event"] == "tick"]
    assert [t["tick"] for t in ticks][:2] == [1, 2]
    assert [e["event"] for e in events][-2:] == ["stopping", "stopped"]
    assert events[-2]["signal"] == "SIGTERM"


def test_a_config_error_exits_non_zero_naming_file_and_line(
        config_copy: Path, tmp_path: Path) -> None:
    otto = config_copy / "personas" / "otto.yaml"
    line = next(n for n, text in enumerate(otto.read_text().splitlines(), 1)
                if text.strip().startswith("tick:"))
    otto.write_text(otto.read_text().replace("tick: 15s", "tik: 15s"))
    agent = _agent(config_copy, tmp_path)
    out, err = agent.communicate(timeout=30)
    assert agent.returncode == 2
    assert f"{otto}:{line}: spec.tik: unknown field (did you mean 'tick'?)" in err
    assert "Traceback" not in err
    assert out == ""
