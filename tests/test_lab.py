"""``zeta-lab`` end to end: the product's front door.

The whole drill runs as ``make lab`` runs it (a subprocess, its output read back):
every step passes and nothing is left running. Ctrl-C (SIGINT to the lab) at a few
points, and ``--keep``, leave nothing running either: no process mentions the lab's
working directory, its ports refuse connections, the directory is gone.
"""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from lab.building import Binaries
from lab.drill import STEPS, parse_steps

REPO = Path(__file__).resolve().parents[1]
DRILL_WITHIN = 420  # the drill takes ~3-4 minutes on two cores; a hung lab must fail
SETUP_WITHIN = 180

pytestmark = pytest.mark.slow


def start_lab(*args: str, within: float) -> subprocess.Popen[str]:
    lab = subprocess.Popen([sys.executable, "-m", "lab", *args], cwd=REPO,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    # A hung lab must fail the test, not hang the suite.
    timer = threading.Timer(within, lab.kill)
    timer.daemon = True
    timer.start()
    return lab


def read_until(lab: subprocess.Popen[str], marker: str) -> list[str]:
    """The lab's lines up to and including the first containing ``marker``."""
    assert lab.stdout is not None
    lines = []
    for line in lab.stdout:
        lines.append(line)
        if marker in line:
            return lines
    pytest.fail(f"the lab ended before saying {marker!r}:\n{''.join(lines)}")


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


def refused(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


def check_nothing_left(output: str) -> None:
    workdir = re.search(r"^lab \| working directory (\S+)$", output, re.MULTILINE)
    assert workdir is not None, output
    assert "nothing left running" in output, output
    assert not Path(workdir[1]).exists()
    assert processes_mentioning(workdir[1]) == []
    for port in re.findall(r"(?:nats-server ready at nats|control plane will listen at https)"
                           r"://127\.0\.0\.1:(\d+)", output):
        assert refused(int(port)), f"port {port} still open\n{output}"


def test_the_whole_drill_passes_and_leaves_nothing_running(k8s_binaries: Binaries) -> None:
    lab = start_lab(within=DRILL_WITHIN)
    output, _ = lab.communicate()
    assert lab.returncode == 0, output
    check_nothing_left(output)
    assert re.search(r"^lab \| all 5 agents ready \(READY=1\): alexa, lior, otto, riven, vera",
                     output, re.MULTILINE), output
    for number in range(1, len(STEPS) + 3):  # the drill, the metrics, audit verify
        assert re.search(rf"^lab \| step {number} PASS in ", output, re.MULTILINE), output
    assert "drill: 7/7 steps passed" in output
    # What each step shows, as the agents said it on the bus.
    assert re.search(r"otto proposes k8s\.node\.cordon on node\.worker-\d", output), output
    assert re.search(r"(alexa|riven|vera|lior) votes approve: confirmed from ", output), output
    assert re.search(r"otto decided APPROVED: \d/3 approvals, no veto", output), output
    assert re.search(r"otto result verified: k8s\.node\.drain", output), output
    assert re.search(r"vera result succeeded: k8s\.node\.uncordon", output), output
    assert re.search(r"otto result succeeded: k8s\.workload\.restart on deployment\.lab/flaky",
                     output), output
    assert re.search(r"finding opened: apiserver-unreachable .*Connection refused", output)
    # The breaker trips as soon as over 30% are NotReady: 3 or 4 of the 9, by timing.
    assert re.search(r"step 4 PASS in .*: breaker tripped: [34]/9 unhealthy", output), output
    assert re.search(r"DROPPED zeta\.repair\.\w+\.vote\.riven: wrong-key", output), output
    assert re.search(r"DROPPED zeta\.repair\.\w+\.vote\.\w+: bad-signature", output), output
    assert "flagged 2 forged, 0 other" in output
    assert re.search(r"^lab \| agents stopped: alexa exit 0, lior exit 0, otto exit 0, "
                     r"riven exit 0, vera exit 0$", output, re.MULTILINE), output


@pytest.mark.parametrize(("args", "marker"), [
    # While the control plane starts: a blocking start-up the lab must let finish, then stop.
    ((), "control plane will listen at"),
    # Mid-drill, with a kubelet stopped and the agents about to act.
    (("--steps", "kubelet"), "lab | stopped the kubelet of"),
])
def test_ctrl_c_at_any_point_stops_everything(k8s_binaries: Binaries, args: tuple[str, ...],
                                               marker: str) -> None:
    lab = start_lab(*args, within=SETUP_WITHIN)
    lines = read_until(lab, marker)
    lab.send_signal(signal.SIGINT)
    output = "".join(lines) + lab.communicate()[0]
    assert lab.returncode == 130, output
    assert "interrupted; stopping everything" in output
    check_nothing_left(output)


def test_keep_leaves_it_up_with_the_commands_to_explore_it_until_ctrl_c(
        k8s_binaries: Binaries) -> None:
    lab = start_lab("--keep", "--steps", "none", within=SETUP_WITHIN)
    lines = read_until(lab, "lab |   tail -f ")
    text = "".join(lines)
    config_dir = re.search(r"zeta-agent watch --config-dir (\S+)", text)
    assert config_dir is not None, text
    assert re.search(r"sub 'zeta\.>' --server nats://127\.0\.0\.1:\d+", text), text
    assert re.search(r"kubectl --kubeconfig \S+/zeta-admin\.kubeconfig get nodes", text), text
    assert re.search(r"kubectl --kubeconfig \S+/credentials/otto/kubeconfig get nodes", text)
    curl = re.search(r"curl --cacert (\S+) -H 'Authorization: Bearer (\w+)' (\S+/api/v1/nodes)",
                     text)
    assert curl is not None, text
    # The printed commands work while it is kept up.
    verify = subprocess.run([sys.executable, "-m", "runtime", "audit", "verify",
                             "--config-dir", config_dir[1]],
                            capture_output=True, text=True, timeout=60, check=False)
    assert verify.returncode == 0, verify.stderr
    nodes = subprocess.run(["curl", "-sf", "--cacert", curl[1], "-H",
                            f"Authorization: Bearer {curl[2]}", curl[3]],
                           capture_output=True, text=True, timeout=30, check=False)
    assert nodes.returncode == 0, nodes.stderr
    assert nodes.stdout.count('"worker-') >= 6
    metrics = re.findall(r"curl -s (http://127\.0\.0\.1:\d+/metrics)    # (\w+)'s", text)
    assert sorted(name for _, name in metrics) == ["alexa", "lior", "otto", "riven", "vera"]
    scraped = subprocess.run(["curl", "-sf", metrics[0][0]], capture_output=True, text=True,
                             timeout=30, check=False)
    assert 'zeta_agent_ticks_total{persona="' in scraped.stdout, scraped
    lab.send_signal(signal.SIGINT)
    output = text + lab.communicate()[0]
    assert lab.returncode == 0, output  # the drill (no steps, audit verify) passed
    check_nothing_left(output)


def test_an_invalid_configuration_starts_nothing(tmp_path: Path) -> None:
    (tmp_path / "personas").mkdir()
    (tmp_path / "personas" / "otto.yaml").write_text("apiVersion: zeta/v1\nkind: Persona\n")
    result = subprocess.run([sys.executable, "-m", "lab", "--config-dir",
                             str(tmp_path)],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2
    assert f"{tmp_path / 'personas' / 'otto.yaml'}:1: metadata: required field" in result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize(("text", "steps"), [
    ("all", STEPS), ("none", ()), ("kubelet", ("kubelet",)),
    ("forged, breaker", ("forged", "breaker")),
])
def test_steps_are_chosen_by_name(text: str, steps: tuple[str, ...]) -> None:
    assert parse_steps(text) == steps


def test_an_unknown_step_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown steps reboot; choose from kubelet, "):
        parse_steps("kubelet,reboot")
