"""``make lab`` end to end: nats-server and the five shipped personas start, then all stop."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from runtime.lab import render_log_line

REPO = Path(__file__).resolve().parents[1]
PERSONAS = ("alexa", "lior", "otto", "riven", "vera")

pytestmark = pytest.mark.slow


def start_lab(*args: str) -> subprocess.Popen[str]:
    lab = subprocess.Popen([sys.executable, "-m", "runtime.lab", "--tick", "1s", *args],
                           cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    # A hung lab must fail the test, not hang the suite.
    timer = threading.Timer(120, lab.kill)
    timer.daemon = True
    timer.start()
    return lab


def processes_mentioning(text: str) -> list[str]:
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            argv = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # the process ended while we looked
            continue
        if text in argv:
            found.append(f"{cmdline.parent.name}: {argv}")
    return found


def check_clean_run(output: str) -> None:
    workdir = re.search(r"^lab +\| working directory (\S+)$", output, re.MULTILINE)
    assert workdir is not None, output
    for name in PERSONAS:
        assert re.search(rf"^{name} +\| READY=1 after ", output, re.MULTILINE), output
        assert re.search(rf"^{name} +\| ready after .* said STOPPING=1, exit code 0$", output,
                         re.MULTILINE), output
    assert "all 5 agents ready" in output
    assert "nothing left running" in output
    assert not Path(workdir[1]).exists()
    assert processes_mentioning(workdir[1]) == []


def test_the_lab_runs_the_five_personas_and_leaves_nothing_running() -> None:
    lab = start_lab("--duration", "2s")
    output, _ = lab.communicate()
    assert lab.returncode == 0, output
    check_clean_run(output)
    for name in PERSONAS:
        # Ticks advanced, so each agent fed the watchdog the lab gave it.
        pings = re.search(rf"^{name} +\| ready after .*, (\d+) watchdog pings", output,
                          re.MULTILINE)
        assert pings is not None
        assert int(pings[1]) >= 1, output
        assert re.search(rf"^{name} +\| \S+ info tick tick=1 ", output, re.MULTILINE), output


def test_ctrl_c_stops_everything_cleanly() -> None:
    lab = start_lab("--duration", "10m")
    assert lab.stdout is not None
    lines = []
    for line in lab.stdout:
        lines.append(line)
        if "agents ready; running for" in line:
            lab.send_signal(signal.SIGINT)
            break
    output = "".join(lines) + lab.communicate()[0]
    assert lab.returncode == 0, output
    assert "interrupted" in output
    check_clean_run(output)


def test_an_invalid_configuration_starts_nothing(tmp_path: Path) -> None:
    (tmp_path / "personas").mkdir()
    (tmp_path / "personas" / "otto.yaml").write_text("apiVersion: zeta/v1\nkind: Persona\n")
    result = subprocess.run([sys.executable, "-m", "runtime.lab", "--config-dir", str(tmp_path)],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2
    assert f"{tmp_path / 'personas' / 'otto.yaml'}:1: metadata: required field" in result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize(
    ("line", "shown"),
    [
        ('{"event": "tick", "level": "info", "timestamp": "2026-11-27T06:00:01.5Z", '
         '"persona": "otto", "tick": 3}', "06:00:01 info tick tick=3"),
        ("Traceback (most recent call last):", "Traceback (most recent call last):"),
        ("[1, 2]", "[1, 2]"),
    ],
)
def test_agent_log_lines_are_shown_compactly(line: str, shown: str) -> None:
    assert render_log_line(line) == shown


def test_the_drill_goes_through_the_quorum_over_the_bus() -> None:
    lab = start_lab("--duration", "14s", "--tick", "1s")
    output, _ = lab.communicate()
    assert lab.returncode == 0, output
    check_clean_run(output)
    assert re.search(r"^otto +\| .* proposing .*action=host\.unit\.restart", output,
                     re.MULTILINE), output
    for voter in ("alexa", "riven", "vera", "lior"):
        assert re.search(rf"^{voter} +\| .* voted .*verdict=approve reason=confirmed from",
                         output, re.MULTILINE), output
    assert re.search(r"^otto +\| .* decided .*outcome=approved", output, re.MULTILINE), output
    assert re.search(r"^otto +\| .* action finished .*ok=True detail=dry-run: .*fencing_token=",
                     output, re.MULTILINE), output
