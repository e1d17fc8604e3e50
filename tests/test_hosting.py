"""Host actuators against a fake ``systemctl`` on PATH: argv, scopes, dry runs, fences,
polkit refusals, revoked peers, timeouts and verification.

The fake is a small script that logs its argv and answers from a JSON state file the
test writes: units and their properties, and per-verb failures. The real systemctl,
systemd and polkit are exercised by the nspawn end-to-end test.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from bus.messages import Target
from runtime.agent.acting import run_actuator
from runtime.agent.wiring import build
from runtime.config.loading import config_paths, load
from runtime.core.engine import Intent
from runtime.core.ports import Actuator, Fence, Outcome, unfenced
from runtime.host.acting import PeerRestart, Reboot, UnitChange, host_actuators
from runtime.host.observing import UnitObserver
from runtime.host.systemctl import POLKIT_DENIALS, Systemctl
from runtime.model.catalog import UnitParams
from runtime.model.formats import Persona
from tests.builders import T0, intent, persona, stale

HOST = "cp-1"
OTTO = persona("otto", scopes=["host:units:restart:k3s.service",
                               "host:units:start:kubelet.service", "host:node:reboot",
                               "agent:peers:restart:*"])
RIVEN = persona("riven", tier="observe", scopes=["bus:vote"], duties=("vote",))

FAKE = '''\
import json, os, sys, time
from pathlib import Path
here = Path(__file__).parent
(here / "environ.json").write_text(json.dumps(sorted(os.environ)))
state = json.loads((here / "state.json").read_text())
with (here / "calls.jsonl").open("a") as log:
    log.write(json.dumps(sys.argv[1:]) + "\\n")
args = [a for a in sys.argv[1:] if not a.startswith("--") or a == "--"]
verb = args[0]
units = state.setdefault("units", {})
failure = state.get("fail", {}).get(verb)
if failure:
    time.sleep(failure.get("hang", 0))
    sys.stderr.write(failure["stderr"] + "\\n")
    sys.exit(failure["code"])
if verb == "show":
    name = args[-1]
    unit = {"LoadState": "not-found", "ActiveState": "inactive", "SubState": "dead",
            "UnitFileState": ""} | units.get(name, {})
    print(f"Id={name}")
    for key in ("LoadState", "ActiveState", "SubState", "NRestarts", "UnitFileState"):
        print(f"{key}={unit.get(key, '')}")
elif verb in ("start", "restart"):
    units[args[-1]].update(state.get("after", {"ActiveState": "active", "SubState": "running"}))
    (here / "state.json").write_text(json.dumps(state))
'''


class FakeSystemctl:
    """The state the fake answers from, and the calls it received."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.state: dict[str, Any] = {"units": {}}
        self.save()

    def save(self) -> None:
        (self.directory / "state.json").write_text(json.dumps(self.state))

    def unit(self, name: str, active: str = "active", sub: str = "running", *,
             file_state: str = "enabled", restarts: int = 0) -> None:
        self.state["units"][name] = {"LoadState": "loaded", "ActiveState": active,
                                     "SubState": sub, "NRestarts": str(restarts),
                                     "UnitFileState": file_state}
        self.save()

    def fail(self, verb: str, stderr: str, code: int = 1, hang: float = 0) -> None:
        self.state.setdefault("fail", {})[verb] = {"stderr": stderr, "code": code, "hang": hang}
        self.save()

    def after(self, active: str, sub: str) -> None:
        self.state["after"] = {"ActiveState": active, "SubState": sub}
        self.save()

    @property
    def calls(self) -> list[list[str]]:
        log = self.directory / "calls.jsonl"
        return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []

    @property
    def changes(self) -> list[list[str]]:
        return [call for call in self.calls if call[0] != "show"]


@pytest.fixture
def fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeSystemctl:
    """A fake ``systemctl`` first on PATH, as the actuators find the real one."""
    script = tmp_path / "systemctl"
    script.write_text(f"#!{sys.executable}\n{FAKE}")
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    return FakeSystemctl(tmp_path)


def _unit_intent(action: str, unit: str, *, host: str | None = HOST,
                 dry_run: bool = False) -> Intent:
    return intent(action, Target(kind="unit", name=unit, host=host), UnitParams(unit=unit),
                  dry_run=dry_run)


def restart(unit: str = "k3s.service", *, host: str | None = HOST,
            dry_run: bool = False) -> Intent:
    return _unit_intent("host.unit.restart", unit, host=host, dry_run=dry_run)


def peer(name: str, *, dry_run: bool = False) -> Intent:
    return intent("agent.peer.restart", Target(kind="persona", name=name), dry_run=dry_run)


def actuators(who: Persona = OTTO, *, timeout: float = 10.0) -> dict[str, Actuator]:
    return host_actuators(who, {"SYSTEMD_EXEC_PID": "1"}, host=HOST, pid=1,
                          systemctl=Systemctl(call_timeout=timeout))


async def _run(action: str, it: Intent, *, who: Persona = OTTO, fence: Fence = unfenced,
               wait: float = 10.0) -> Outcome:
    return await run_actuator(actuators(who, timeout=wait)[action], it, "r1", fence)


# ---------------------------------------------------------------- registration


def test_host_actuators_exist_only_in_the_process_systemd_started() -> None:
    assert host_actuators(OTTO, {}) == {}
    # A child of a systemd-managed process (a test runner, the lab) inherits the variable.
    assert host_actuators(OTTO, {"SYSTEMD_EXEC_PID": "1234"}, pid=1235) == {}
    registered = host_actuators(OTTO, {"SYSTEMD_EXEC_PID": "1234"}, host=HOST, pid=1234)
    assert sorted(registered) == ["agent.peer.restart", "host.node.reboot", "host.unit.restart",
                                  "host.unit.start"]
    assert isinstance(registered["host.unit.start"], UnitChange)
    assert isinstance(registered["agent.peer.restart"], PeerRestart)
    assert isinstance(registered["host.node.reboot"], Reboot)


# ---------------------------------------------------------------- units


async def test_restart_runs_a_strict_argv_and_verifies(fake: FakeSystemctl) -> None:
    fake.unit("k3s.service", "failed", "failed", restarts=5)
    with capture_logs() as logs:
        outcome = await _run("host.unit.restart", restart())
    assert outcome == Outcome(True, "restarted k3s.service; now k3s.service: loaded, "
                                    "active/running, enabled, 5 restarts")
    assert fake.changes == [["--no-ask-password", "restart", "--", "k3s.service"]]
    assert [c[0] for c in fake.calls] == ["show", "--no-ask-password", "show"]
    assert fake.calls[0] == ["show", "--no-pager", "--property=Id,LoadState,ActiveState,"
                             "SubState,NRestarts,UnitFileState", "--", "k3s.service"]
    assert logs == [{"event": "host change made", "verb": "restart", "unit": "k3s.service",
                     "log_level": "info"}]


async def test_systemctl_never_inherits_the_agents_line_to_systemd(
        fake: FakeSystemctl, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # systemd's tools report their failures on $NOTIFY_SOCKET: one the agent runs would
    # speak for the agent (and block where nobody reads the socket).
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify.sock"))
    monkeypatch.setenv("WATCHDOG_USEC", "60000000")
    monkeypatch.setenv("WATCHDOG_PID", "1")
    fake.unit("k3s.service", "failed", "failed")
    for run in (lambda: _run("host.unit.restart", restart()),
                lambda: UnitObserver(["k3s.service"]).observe(T0)):
        (fake.directory / "environ.json").unlink(missing_ok=True)
        await run()
        seen = set(json.loads((fake.directory / "environ.json").read_text()))
        assert "PATH" in seen
        assert not seen & {"NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"}


async def test_a_unit_left_failed_is_reported_as_a_failure(fake: FakeSystemctl) -> None:
    fake.unit("k3s.service", "failed", "failed")
    fake.after("failed", "failed")
    outcome = await _run("host.unit.restart", restart())
    assert not outcome.ok
    assert outcome.detail.startswith("restart of k3s.service did not leave it running; now "
                                     "k3s.service: loaded, failed/failed")


async def test_dry_run_says_what_would_run_and_changes_nothing(fake: FakeSystemctl) -> None:
    fake.unit("k3s.service", "failed", "failed")
    outcome = await _run("host.unit.restart", restart(dry_run=True))
    assert outcome == Outcome(True, (
        "dry-run: would run `systemctl --no-ask-password restart -- k3s.service` as zeta-otto; "
        "now k3s.service: loaded, failed/failed, enabled, 0 restarts"))
    assert fake.changes == []


async def test_a_unit_that_does_not_exist_fails_even_in_a_dry_run(fake: FakeSystemctl) -> None:
    outcome = await _run("host.unit.restart", restart(dry_run=True))
    assert outcome == Outcome(False, "refused: k3s.service does not exist on cp-1")


async def test_the_scope_is_checked_before_any_call(fake: FakeSystemctl) -> None:
    fake.unit("k3s.service", "failed", "failed")
    outcome = await _run("host.unit.restart", restart(), who=RIVEN)
    assert outcome == Outcome(False, "refused: scope host:units:restart:k3s.service is not "
                                     "granted to riven")
    # otto may restart k3s but not start it: the verb is part of the scope.
    outcome = await _run("host.unit.start", _unit_intent("host.unit.start", "k3s.service"))
    assert outcome.detail == ("refused: scope host:units:start:k3s.service is not granted to "
                              "otto")
    assert fake.calls == []


async def test_a_stale_fence_stops_before_the_change(fake: FakeSystemctl) -> None:
    fake.unit("k3s.service", "failed", "failed")
    outcome = await _run("host.unit.restart", restart(), fence=stale)
    assert outcome == Outcome(False, "refused: fencing token stale: stopped before "
                                     "`restart k3s.service`")
    assert fake.changes == []


@pytest.mark.parametrize("denial", POLKIT_DENIALS)
async def test_a_polkit_refusal_is_a_mismatch_and_not_retried(fake: FakeSystemctl,
                                                              denial: str) -> None:
    fake.unit("k3s.service", "failed", "failed")
    fake.fail("restart", f"Failed to restart k3s.service: {denial}", code=4)
    outcome = await _run("host.unit.restart", restart())
    assert outcome == Outcome(False, (
        "scope/polkit mismatch: otto's scopes allow host:units:restart:k3s.service, but polkit "
        "refused zeta-otto `systemctl --no-ask-password restart -- k3s.service` (exit 4: Failed "
        f"to restart k3s.service: {denial}); install `zeta-agent render polkit otto` in "
        "/etc/polkit-1/rules.d"))
    assert len(fake.changes) == 1


async def test_other_failures_say_what_systemctl_said(fake: FakeSystemctl) -> None:
    fake.unit("k3s.service", "failed", "failed")
    fake.fail("restart", "Job for k3s.service failed because the control process exited "
                         "with error code.", code=1)
    outcome = await _run("host.unit.restart", restart())
    assert outcome == Outcome(False, (
        "`systemctl --no-ask-password restart -- k3s.service`: exit 1: Job for k3s.service "
        "failed because the control process exited with error code."))


async def test_a_slow_job_is_judged_by_the_units_state(fake: FakeSystemctl) -> None:
    """systemctl waits for systemd's job; past the timeout the client is killed (the job
    goes on in systemd) and the unit's state decides."""
    fake.unit("k3s.service", "activating", "start")
    fake.fail("restart", "never printed", hang=30)
    outcome = await _run("host.unit.restart", restart(), wait=0.3)
    assert outcome == Outcome(True, (
        "restarted k3s.service (systemctl gave up waiting after 0.3s); now k3s.service: "
        "loaded, activating/start, enabled, 0 restarts"))


async def test_start_leaves_a_running_unit_alone(fake: FakeSystemctl) -> None:
    fake.unit("kubelet.service")
    outcome = await _run("host.unit.start", _unit_intent("host.unit.start", "kubelet.service"))
    assert outcome == Outcome(True, "kubelet.service is already active: not started")
    assert fake.changes == []


async def test_units_of_other_hosts_are_not_touched(fake: FakeSystemctl) -> None:
    fake.unit("k3s.service", "failed", "failed")
    outcome = await _run("host.unit.restart", restart(host="worker-7"))
    assert outcome.detail == ("refused: k3s.service is on worker-7; this agent runs on cp-1 "
                              "and acts on its own host only")
    assert fake.calls == []


async def test_a_missing_systemctl_is_a_failure_not_a_crash(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    outcome = await _run("host.unit.restart", restart())
    assert outcome == Outcome(False, (
        "`systemctl show --no-pager --property=Id,LoadState,ActiveState,SubState,NRestarts,"
        "UnitFileState -- k3s.service`: cannot run it: No such file or directory"))


# ---------------------------------------------------------------- peers


async def test_a_silent_peer_is_restarted(fake: FakeSystemctl) -> None:
    fake.unit("zeta-agent@vera.service", "inactive", "dead")
    outcome = await _run("agent.peer.restart", peer("vera"))
    assert outcome.ok, outcome.detail
    assert fake.changes == [["--no-ask-password", "restart", "--", "zeta-agent@vera.service"]]


@pytest.mark.parametrize("file_state", ["disabled", "masked"])
async def test_a_revoked_peer_stays_down(fake: FakeSystemctl, file_state: str) -> None:
    fake.unit("zeta-agent@lior.service", "inactive", "dead", file_state=file_state)
    outcome = await _run("agent.peer.restart", peer("lior"))
    assert outcome == Outcome(False, f"refused: zeta-agent@lior.service is {file_state}: an "
                                     "operator revoked it, it stays down")
    assert fake.changes == []


async def test_an_agent_never_restarts_itself_nor_a_peer_of_another_host(
        fake: FakeSystemctl) -> None:
    outcome = await _run("agent.peer.restart", peer("otto"))
    assert outcome.detail == ("refused: an agent does not restart itself: the call would end "
                              "it mid-repair")
    outcome = await _run("agent.peer.restart", peer("alexa", dry_run=True))
    assert outcome.detail == "refused: zeta-agent@alexa.service does not exist on cp-1"


async def test_peer_scopes_are_checked(fake: FakeSystemctl) -> None:
    fake.unit("zeta-agent@vera.service", "inactive", "dead")
    who = persona("nova", scopes=["agent:peers:restart:lior"])
    outcome = await _run("agent.peer.restart", peer("vera"), who=who)
    assert outcome.detail == "refused: scope agent:peers:restart:vera is not granted to nova"


# ---------------------------------------------------------------- reboot


def _reboot(name: str = HOST, *, dry_run: bool = False) -> Intent:
    return intent("host.node.reboot", Target(kind="host", name=name), dry_run=dry_run)


async def test_reboot_of_this_host_only(fake: FakeSystemctl) -> None:
    assert await _run("host.node.reboot", _reboot(dry_run=True)) == Outcome(
        True, "dry-run: would run `systemctl --no-ask-password reboot` as zeta-otto")
    assert (await _run("host.node.reboot", _reboot("worker-7"))).detail == (
        "refused: the host to reboot is on worker-7; this agent runs on cp-1 and acts on its "
        "own host only")
    assert fake.changes == []
    assert await _run("host.node.reboot", _reboot()) == Outcome(True, "reboot of cp-1 requested")
    assert fake.changes == [["--no-ask-password", "reboot"]]


async def test_reboot_needs_its_scope_and_polkit(fake: FakeSystemctl) -> None:
    no_reboot = persona("nova", scopes=["host:units:restart:k3s.service"])
    assert (await _run("host.node.reboot", _reboot(), who=no_reboot)).detail == (
        "refused: scope host:node:reboot is not granted to nova")
    fake.fail("reboot", "Failed to reboot system via logind: Interactive authentication "
                        "required.")
    outcome = await _run("host.node.reboot", _reboot())
    assert outcome.detail.startswith("scope/polkit mismatch: otto's scopes allow "
                                     "host:node:reboot, but polkit refused zeta-otto")


def test_build_registers_them_in_the_agent_systemd_started(tmp_path: Path) -> None:
    config = load(config_paths(Path(__file__).resolve().parent.parent))
    host = {"host.unit.start", "host.unit.restart", "host.node.reboot", "agent.peer.restart"}
    under_systemd = build(config, "otto", state_dir=tmp_path, host=HOST,
                          environ={"SYSTEMD_EXEC_PID": str(os.getpid())})
    assert host <= set(under_systemd.execution.actuators.names)
    in_a_terminal = build(config, "otto", state_dir=tmp_path, host=HOST, environ={})
    assert not host & set(in_a_terminal.execution.actuators.names)
