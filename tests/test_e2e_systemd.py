"""End to end in real systemd: the five personas as zeta-agent@.service instances in a booted
Debian 12 container, repairing a stand-in control plane through systemd and polkit.

The container (tests/nspawn.py) runs systemd 252 as PID 1, D-Bus and polkit. It is set up
the way docs/operations.md tells an operator to set up a host; each step below says which.
The only departures are for time: personas tick every 2 s, detections need seconds
rather than a minute (``for:``), cooldowns are short, and a drop-in shortens the
watchdog. The control plane is the real one (etcd and kube-apiserver from the
Kubernetes tests, runtime/cluster) run as two units of the container: ``etcd.service``
and ``k3s.service``, the unit the shipped policy restarts.

The tests share one container and run in file order; each starts from "every persona
enabled and running" (the ``fleet`` fixture) so any one can also run alone.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from lab.building import Binaries, ensure_binaries, k8s_cache
from lab.controlplane import ControlPlane
from lab.fleet import prepare_config
from lab.natsserver import free_ports
from lab.tools import Progress, ToolUnavailableError
from runtime.host.systemctl import POLKIT_DENIALS
from tests.conftest import REPO
from tests.k8s import past_capture
from tests.nspawn import VENV, Container, prerequisites
from tests.prereq import missing

pytestmark = pytest.mark.slow

PERSONAS = ("alexa", "lior", "otto", "riven", "vera")
ZETA = f"{VENV}/bin/zeta-agent"
CONFIG = "/etc/zeta"
CREDENTIALS = f"{CONFIG}/credentials"
OPERATOR = "oncall"
TICK = timedelta(seconds=2)
WATCHDOG = "10s"
START_TIMEOUT = 60.0
REPAIR_TIMEOUT = 120.0
API_BACK_TIMEOUT = 90.0
APISERVER_UNREACHABLE = {
    "detect": {"kind": "apiserver-unreachable", "minPaths": 2, "for": "4s"},
    # Short, so the second outage (with nova voting) is repaired minutes, not ten, later.
    "cooldown": "5s",
}
# Longer than the watchdog path (10s without a ping, 5s to SIGKILL, 1s to restart), so
# a peer's restart never races systemd's own in the watchdog test.
PEER_SILENT = {"detect": {"kind": "peer-silent", "silentAfter": "20s", "for": "4s"}}


def tagged(progress: Progress) -> Progress:
    """Progress lines with this file's tag and the time."""
    return lambda line: progress(f"[e2e-systemd {time.strftime('%H:%M:%S')}] {line}")


def agent(persona: str) -> str:
    return f"zeta-agent@{persona}.service"


@dataclass
class Host:
    """The booted container, set up as an operator would, and its control plane."""

    box: Container
    plane: ControlPlane
    bus_port: int
    progress: Progress

    def zeta(self, *args: str, check: bool = True) -> str:
        """``zeta-agent ARGS`` as root in the container; its stdout."""
        return self.box.run([ZETA, *args], check=check, timeout=120).stdout

    def now(self) -> str:
        """The container's clock, in the form ``journalctl --since`` takes."""
        return self.box.run(["date", "+%Y-%m-%d %H:%M:%S"]).stdout.strip()

    def events(self, persona: str, since: str) -> list[dict[str, Any]]:
        """The agent's structured log lines (JSON on stdout, kept by the journal)."""
        out = []
        for entry in self.box.journal_json(agent(persona), since=since):
            message = entry.get("MESSAGE")
            if isinstance(message, str) and message.startswith("{"):
                try:
                    out.append(json.loads(message))
                except ValueError:
                    continue
        return out

    def wait_event(self, persona: str, since: str, what: str,
                   match: Callable[[dict[str, Any]], bool], timeout: float) -> dict[str, Any]:
        """The first log line of ``persona`` since ``since`` that ``match``es, polling."""
        deadline = time.monotonic() + timeout
        while True:
            found = [e for e in self.events(persona, since) if match(e)]
            if found:
                return found[0]
            if time.monotonic() > deadline:
                raise AssertionError(f"{persona}: no log line {what} within {timeout:g}s; "
                                     f"journal:\n{self.box.journal(agent(persona), lines=30)}")
            time.sleep(1.0)

    def audit(self, *args: str) -> list[dict[str, Any]]:
        """``zeta-agent audit --json`` with the operator's key: one object per line."""
        out = self.zeta("audit", "--json", "--seed", f"{CREDENTIALS}/{OPERATOR}/nkey.seed",
                        *args)
        return [json.loads(line) for line in out.splitlines() if line.startswith("{")]

    def wait_repair(self, match: Callable[[dict[str, Any]], bool],
                    timeout: float) -> dict[str, Any]:
        """The latest repair summary in the audit that ``match``es, polling."""
        deadline = time.monotonic() + timeout
        while True:
            found = [s for s in self.audit() if match(s)]
            if found:
                return found[-1]
            if time.monotonic() > deadline:
                raise AssertionError(f"no such repair in the audit within {timeout:g}s: "
                                     f"{self.audit()}")
            time.sleep(2.0)

    def api_up(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not self.plane.ready():
            if time.monotonic() > deadline:
                raise AssertionError(f"the API server is not ready within {timeout:g}s: "
                                     f"{self.box.state('k3s.service')}\n"
                                     f"{self.box.journal('k3s.service', lines=20)}")
            time.sleep(1.0)


# ---------------------------------------------------------------- setting up the host


def _exec_start(argv: list[str]) -> str:
    for arg in argv:
        # ExecStart= has quoting rules of its own; the control plane's flags need none.
        assert re.fullmatch(r"[\w./:=,@+-]+", arg), f"needs quoting in ExecStart=: {arg!r}"
    return " ".join(argv)


def control_plane_units(plane: ControlPlane, binaries: Binaries) -> dict[str, str]:
    """etcd.service and k3s.service (kube-apiserver) running the test control plane.

    The PKI, token file and flags are ControlPlane's own (made on the host, bind-mounted
    at the same path). k3s.service has no Restart=: once killed it stays down until
    someone restarts it, which is what the agents are for.
    """
    commands = plane.commands(binaries)  # systemd runs them, not ControlPlane.start()
    etcd = _exec_start(commands["etcd"])
    apiserver = _exec_start(commands["kube-apiserver"])
    return {
        "etcd.service": f"""[Unit]
Description=etcd for the stand-in control plane

[Service]
ExecStart={etcd}
Restart=on-failure
""",
        "k3s.service": f"""[Unit]
Description=Stand-in for k3s: the real kube-apiserver
Requires=etcd.service
After=etcd.service

[Service]
Type=exec
ExecStart={apiserver}
""",
    }


def set_up(box: Container, plane: ControlPlane, binaries: Binaries, staging: Path,
           progress: Progress) -> Host:
    """What docs/operations.md tells an operator to do on a systemd host, in order."""
    started = time.monotonic()
    # 1. Install the package: a venv in /opt/zeta-agent (the cached layer holds the
    #    dependencies; the project is this working tree, reinstalled every run).
    box.install_project()
    progress(f"project installed ({time.monotonic() - started:.0f}s)")
    host = Host(box, plane, free_ports(1)[0], progress)
    # 2. The unit files (to /etc/systemd/system) and the tmpfiles.d entry making
    #    /etc/zeta and its root-only credentials directory.
    for source in sorted((REPO / "systemd").rglob("*")):
        if source.is_file():
            relative = source.relative_to(REPO / "systemd")
            where = "/etc/systemd/system" if len(relative.parts) == 1 else "/etc"
            box.write(f"{where}/{relative}", source.read_text(encoding="utf-8"))
    box.run(["systemd-tmpfiles", "--create", "/etc/tmpfiles.d/zeta-agent.conf"])
    # 3. An operator key, to sign freeze/thaw and to read the audit.
    operator_key = host.zeta("keygen", OPERATOR).strip()
    # 4. The configuration in /etc/zeta: the shipped personas and policies, and a
    #    fleet.yaml naming the bus, the API server and the operator. (The test tunes
    #    timings; and vera is given the apiserver-unreachable policy without the scope
    #    to act on it, to show the runtime refusing.)
    prepare_config(REPO, staging, tick=TICK, nats_url=f"nats://127.0.0.1:{host.bus_port}",
                   dry_run=False,
                   policy_spec={"apiserver-unreachable": APISERVER_UNREACHABLE,
                                "peer-silent": PEER_SILENT},
                   fleet_spec={"credentialsDir": CREDENTIALS, "apiservers": [plane.url],
                               "operators": [{"name": OPERATOR, "nkey": operator_key}]})
    vera_file = staging / "personas" / "vera.yaml"
    vera, added = re.subn(r"^( *)- cordon-without-owner\n",
                          r"\g<0>\1- apiserver-unreachable\n",
                          vera_file.read_text(encoding="utf-8"), flags=re.MULTILINE)
    assert added == 1, vera
    vera_file.write_text(vera, encoding="utf-8")
    for part in ("personas", "policies"):
        for path in sorted((staging / part).glob("*.yaml")):
            box.write(f"{CONFIG}/{part}/{path.name}", path.read_text(encoding="utf-8"))
    box.write(f"{CONFIG}/fleet.yaml", (staging / "fleet.yaml").read_text(encoding="utf-8"))
    # 5. One key per persona: the seed in /etc/zeta/credentials/<name>/ (root only), the
    #    public key into the persona file.
    for persona in PERSONAS:
        host.zeta("keygen", persona, "--write")
    progress(f"configuration and keys in {CONFIG} ({time.monotonic() - started:.0f}s)")
    render_system_files(host, PERSONAS)
    progress(f"system files rendered ({time.monotonic() - started:.0f}s)")
    # Test only: a hung agent is killed after 10s rather than a minute, and the SIGABRT
    # systemd sends first (which a stopped process cannot act on) is followed by SIGKILL
    # after 5s. And the stand-in control plane's units.
    box.write("/etc/systemd/system/zeta-agent@.service.d/90-test-timing.conf",
              f"[Service]\nWatchdogSec={WATCHDOG}\nTimeoutAbortSec=5s\nRestartSec=1s\n")
    for name, text in control_plane_units(plane, binaries).items():
        box.write(f"/etc/systemd/system/{name}", text)
    # 7. The bus (the agents are started by the tests).
    box.systemctl("daemon-reload")
    box.systemctl("enable", "--now", "zeta-bus.service")
    box.wait_running("zeta-bus.service", timeout=30)
    # 8. The operator makes the audit stream and lease bucket, once: agents only check them.
    host.zeta("bus", "init", "--operator", OPERATOR, "--timeout", "30")
    box.systemctl("start", "k3s.service", timeout=120)
    host.api_up(API_BACK_TIMEOUT)
    progress(f"host set up in {time.monotonic() - started:.0f}s: bus on "
             f"127.0.0.1:{host.bus_port}, API server {plane.url}")
    return host


def render_system_files(host: Host, personas: tuple[str, ...]) -> None:
    """6. Users, bus permissions, polkit rules and unit drop-ins, rendered from /etc/zeta.

    Re-run after adding a persona (or changing one's scopes): everything is rendered.
    """
    box = host.box
    box.write("/etc/sysusers.d/zeta-agent.conf", host.zeta("render", "sysusers"))
    box.run(["systemd-sysusers"])
    box.write(f"{CONFIG}/nats.conf",
              host.zeta("render", "nats", "--listen", f"127.0.0.1:{host.bus_port}"))
    box.write("/etc/polkit-1/rules.d/60-zeta-agents.rules",
              host.zeta("render", "polkit", "--all"))
    for persona in personas:
        box.write(f"/etc/systemd/system/zeta-agent@{persona}.service.d/50-zeta.conf",
                  host.zeta("render", "unit", persona))


@pytest.fixture(scope="module")
def host(tmp_path_factory: pytest.TempPathFactory, pytestconfig: pytest.Config) -> Iterator[Host]:
    lacking = prerequisites()
    if lacking:
        missing("the systemd end-to-end tests need " + ", ".join(lacking))
    progress = tagged(past_capture(pytestconfig))
    try:
        binaries = ensure_binaries(progress=progress)
    except ToolUnavailableError as exc:
        missing(f"the Kubernetes control plane binaries ({k8s_cache()}): {exc}")
    workdir = tmp_path_factory.mktemp("e2e-systemd")
    plane = ControlPlane(workdir / "k8s")
    started = time.monotonic()
    # The control plane's directory is bound at its own path, so ControlPlane's flags
    # (absolute paths into it) hold inside the container too; the binaries likewise.
    box = Container(workdir / "box", binds=[binaries.apiserver.parent], progress=progress,
                    writable_binds=[plane.workdir])
    plane.workdir.mkdir(parents=True)
    with box:
        try:
            yield set_up(box, plane, binaries, workdir / "staging", progress)
        except BaseException:
            progress(f"journal (last lines):\n{box.journal(lines=60)}")
            raise
        finally:
            progress(f"tests done after {time.monotonic() - started:.0f}s; powering off")


@pytest.fixture
def fleet(host: Host) -> Host:
    """Every persona enabled and running (whatever an earlier test left)."""
    units = [agent(p) for p in PERSONAS]
    host.box.systemctl("enable", "--now", *units)
    for unit in units:
        host.box.wait_running(unit, timeout=START_TIMEOUT)
    return host


# ---------------------------------------------------------------- the units


def test_every_persona_reaches_active_running_via_ready(host: Host) -> None:
    box = host.box
    since = host.now()
    started = time.monotonic()
    box.systemctl("start", *(agent(p) for p in PERSONAS))
    for persona in PERSONAS:
        # Type=notify: systemd shows "active (running)" only after READY=1.
        state = box.wait_running(agent(persona), timeout=START_TIMEOUT)
        assert state.main_pid > 0
        ready = host.wait_event(persona, since, "'ready'", lambda e: e.get("event") == "ready",
                                timeout=10)
        assert ready["persona"] == persona
        user = box.run(["stat", "--format=%U", f"/proc/{state.main_pid}"]).stdout.strip()
        assert user == f"zeta-{persona}"
    host.progress(f"five agents active (running) in {time.monotonic() - started:.1f}s")
    # STATUS= after every tick.
    status = box.systemctl("show", agent("otto"), "--property=StatusText").stdout
    assert status.startswith("StatusText=tick ")
    # The bus is on, so the agent has its seed, though its user cannot read the seed
    # file (root-only, and hidden from the unit too): PID 1 handed it over through
    # LoadCredential=.
    starting = host.wait_event("otto", since, "'starting'",
                               lambda e: e.get("event") == "starting", timeout=5)
    assert starting["bus"] == [f"nats://127.0.0.1:{host.bus_port}"]
    hidden = box.run(["ls", f"{CREDENTIALS}/otto"], user="zeta-otto", check=False)
    assert hidden.returncode != 0


def crash(box: Container, unit: str) -> None:
    """SIGKILL the unit's main process, as a crash would.

    Not ``systemctl kill``: on this host's cgroup v1 it also signals the unit's other
    processes through the cgroup, and once failed with EIO on a process on its way out.
    """
    box.run(["kill", "-9", str(box.state(unit).main_pid)])


def test_kill_9_is_restarted_by_systemd(fleet: Host) -> None:
    box = fleet.box
    before = box.state(agent("alexa"))
    box.run(["kill", "-9", str(before.main_pid)])
    after = box.wait_for(agent("alexa"), "restarted and running again",
                         lambda s: s.restarts > before.restarts and s.sub == "running"
                         and s.main_pid not in (0, before.main_pid), timeout=START_TIMEOUT)
    fleet.progress(f"kill -9 alexa: restarted, {after}")


def test_a_hung_agent_is_killed_by_the_watchdog_and_restarted(fleet: Host) -> None:
    # The hang: SIGSTOP. A stopped process runs no code at all, so its watchdog task
    # sends no WATCHDOG=1, exactly as when a tick blocks the event loop (a hung
    # statvfs, say). The in-loop case (a tick awaiting forever while the loop runs) is
    # the agent's own rule, advancing(), tested in tests/test_agent.py; here the point
    # is systemd's side: WatchdogSec= fires, the process is killed and restarted.
    box = fleet.box
    since = fleet.now()
    before = box.state(agent("riven"))
    box.run(["kill", "-STOP", str(before.main_pid)])
    after = box.wait_for(agent("riven"), "restarted after a watchdog timeout",
                         lambda s: s.restarts > before.restarts and s.sub == "running",
                         timeout=60)
    log = box.journal(agent("riven"), since=since, lines=200)
    assert "Watchdog timeout" in log, log
    fleet.progress(f"SIGSTOP riven: watchdog killed it, {after}")


def test_the_target_starts_every_enabled_instance(fleet: Host) -> None:
    box = fleet.box
    box.systemctl("stop", "zeta-agents.target")
    for persona in PERSONAS:  # PartOf=: stopping the target stopped them all
        box.wait_for(agent(persona), "inactive", lambda s: s.active == "inactive", timeout=30)
    box.systemctl("start", "zeta-agents.target")
    for persona in PERSONAS:
        box.wait_running(agent(persona), timeout=START_TIMEOUT)


def test_disable_now_revokes_an_agent_and_it_stays_down(fleet: Host) -> None:
    box = fleet.box
    since = fleet.now()
    box.systemctl("disable", "--now", agent("lior"))
    try:
        assert box.state(agent("lior")).active == "inactive"
        # Otto's peer-silent policy notices lior's silence and would restart it: the
        # actuator refuses a disabled unit, so mutual repair never undoes a revocation.
        refused = fleet.wait_event(
            "otto", since, "refusing to restart revoked lior",
            lambda e: e.get("event") == "action finished"
            and "zeta-agent@lior.service is disabled" in str(e.get("detail")), timeout=60)
        fleet.progress(f"otto on silent lior: {refused.get('event')}: {refused.get('detail')}")
        # No longer WantedBy the target; `start` returns once the target's jobs are done.
        box.systemctl("start", "zeta-agents.target")
        state = box.state(agent("lior"))
        assert state.active == "inactive", state
        assert box.systemctl("is-enabled", agent("lior"), check=False).stdout.strip() == \
            "disabled"
    finally:
        box.systemctl("enable", "--now", agent("lior"))


def test_mutual_repair_restarts_a_silent_peer(fleet: Host) -> None:
    box = fleet.box
    since = fleet.now()
    started = time.monotonic()
    box.systemctl("stop", agent("alexa"))
    # Stopped (still enabled): alexa's heartbeats stop; otto, holding
    # agent:peers:restart:*, runs `systemctl restart zeta-agent@alexa.service` as
    # zeta-otto, which its polkit rule allows.
    fleet.wait_event("otto", since, "restarting alexa",
                     lambda e: e.get("event") == "host change made"
                     and e.get("unit") == agent("alexa"), timeout=REPAIR_TIMEOUT)
    box.wait_running(agent("alexa"), timeout=START_TIMEOUT)
    fleet.progress(f"stopped alexa restarted by otto after {time.monotonic() - started:.0f}s")
    # Verified (alexa's heartbeats are back) and audited.
    repair = fleet.wait_repair(lambda s: s["action"] == "agent.peer.restart"
                               and s["target"].endswith("alexa") and s["result"] == "verified",
                               REPAIR_TIMEOUT)
    assert repair["executor"] == "otto"


# ---------------------------------------------------------------- out of band


def test_polkit_allows_exactly_the_units_and_verbs_the_scopes_name(fleet: Host) -> None:
    box = fleet.box

    def refused(persona: str, verb: str, unit: str) -> None:
        """polkit refuses ``persona``'s user ``systemctl VERB UNIT``."""
        done = box.run(["systemctl", "--no-ask-password", verb, "--", unit],
                       user=f"zeta-{persona}", check=False)
        assert done.returncode != 0, (persona, verb, unit)
        assert any(d in done.stderr for d in POLKIT_DENIALS), done.stderr

    # vera holds no host scope: polkit refuses her whatever the unit.
    refused("vera", "restart", "k3s.service")
    # otto holds host:units:restart:k3s.service: not start, not stop, nothing on dbus.
    for verb, unit in (("start", "k3s.service"), ("stop", "k3s.service"),
                       ("restart", "dbus.service")):
        refused("otto", verb, unit)
    # riven (observe tier) may not even restart a peer; otto may not stop one.
    refused("riven", "restart", agent("alexa"))
    refused("otto", "stop", agent("alexa"))
    assert fleet.plane.ready()  # none of it touched the API server


def test_api_server_outage_is_repaired_through_systemd_after_a_quorum(fleet: Host) -> None:
    box = fleet.box
    since = fleet.now()
    started = time.monotonic()
    # First without otto, the only persona holding host:units:restart:k3s.service, so
    # vera (who watches the API server but holds no host scope) is the one to act.
    box.systemctl("stop", agent("otto"))
    crash(box, "k3s.service")
    box.wait_for("k3s.service", "down", lambda s: s.active in ("failed", "inactive"),
                 timeout=30)
    fleet.progress("k3s.service (kube-apiserver) killed, otto stopped")
    # Her runtime refuses before any systemctl (polkit would too: the test above).
    refused = fleet.wait_event(
        "vera", since, "refusing host.unit.restart",
        lambda e: e.get("event") == "intent refused" and e.get("action") == "host.unit.restart",
        timeout=60)
    assert "host:units:restart:k3s.service is not granted to vera" in refused["reason"]
    assert box.state("k3s.service").active in ("failed", "inactive")
    fleet.progress(f"vera refused by her runtime: {refused['reason']}")
    # Otto back: unreachable along both paths (TCP and /readyz) for 4s → proposal →
    # alexa, riven, vera, lior re-observe and vote → approved → `systemctl restart
    # k3s.service` as zeta-otto, allowed by otto's polkit rule.
    box.systemctl("start", agent("otto"))
    fleet.wait_event("otto", since, "restarting k3s.service",
                     lambda e: e.get("event") == "host change made"
                     and e.get("unit") == "k3s.service", timeout=REPAIR_TIMEOUT)
    fleet.api_up(API_BACK_TIMEOUT)
    fleet.progress(f"API server back after {time.monotonic() - started:.0f}s")
    # Verified (the API server answers again) and audited.
    repair = fleet.wait_repair(lambda s: s["action"] == "host.unit.restart"
                               and s["result"] == "verified", REPAIR_TIMEOUT)
    assert repair["proposer"] == "otto"
    assert repair["executor"] == "otto"
    assert repair["decision"] == "approved"
    messages = [m["envelope"] for m in fleet.audit("--repair", repair["repair"])]
    # Unreachable along more than one path: the TCP connect and GET /readyz.
    proposal = json.dumps(next(m for m in messages if m["kind"] == "proposal")["body"])
    port = fleet.plane.url.rsplit(":", 1)[1]
    assert f"tcp 127.0.0.1:{port}" in proposal, proposal
    assert f"readyz {fleet.plane.url}" in proposal, proposal
    decision = next(m for m in messages if m["kind"] == "decision")["body"]
    assert len(set(decision["approvals"]) - {"otto"}) >= 2, decision


def test_a_sixth_persona_is_configuration_only_and_counts_in_the_next_quorum(
        fleet: Host) -> None:
    box = fleet.box
    # The operator writes nova.yaml, makes its key, re-renders the system files, and
    # restarts the fleet so every agent knows the new voter's key. No code changes.
    box.write(f"{CONFIG}/personas/nova.yaml", """apiVersion: zeta/v1
kind: Persona
metadata:
  name: nova
spec:
  displayName: Nova
  role: second-opinion
  description: Votes on control-plane repairs from her own observation.
  identity:
    nkey: UAVU6MCTMJRPGFHMLWUVPDZUTOSFEKL2NRLLKZEVG574EVSST2TEX66Q
    kubernetes: {user: zeta-nova}
  tier: observe
  scopes: [bus:vote]
  duties: [vote]
  policies: [apiserver-unreachable]
  tick: 2s
  brain: {kind: rules}
""")
    fleet.zeta("keygen", "nova", "--write")
    everyone = (*PERSONAS, "nova")
    render_system_files(fleet, everyone)
    box.systemctl("daemon-reload")
    box.systemctl("reload", "zeta-bus.service")
    box.systemctl("enable", agent("nova"))
    box.systemctl("restart", "zeta-agents.target")
    for persona in everyone:
        box.wait_running(agent(persona), timeout=START_TIMEOUT)
    # Make nova's vote necessary: with alexa, vera and lior revoked, the 3 approvals
    # can only be otto's (the proposer), riven's and nova's.
    revoked = ("alexa", "vera", "lior")
    box.systemctl("disable", "--now", *(agent(p) for p in revoked))
    try:
        since = fleet.now()
        earlier = {s["repair"] for s in fleet.audit()}
        crash(box, "k3s.service")
        fleet.wait_event("otto", since, "restarting k3s.service",
                         lambda e: e.get("event") == "host change made"
                         and e.get("unit") == "k3s.service", timeout=REPAIR_TIMEOUT)
        fleet.api_up(API_BACK_TIMEOUT)
        repair = fleet.wait_repair(lambda s: s["repair"] not in earlier
                                   and s["action"] == "host.unit.restart"
                                   and s["result"] == "verified", REPAIR_TIMEOUT)
        assert repair["decision"] == "approved"
        messages = fleet.audit("--repair", repair["repair"])
        decision = next(m["envelope"] for m in messages
                        if m.get("envelope", {}).get("kind") == "decision")
        assert "nova" in decision["body"]["approvals"], decision
    finally:
        box.systemctl("enable", "--now", *(agent(p) for p in revoked))

