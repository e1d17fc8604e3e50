"""``zeta-agent`` subcommands, called in-process through ``main``."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import pytest
import structlog

from bus.subjects import PERSONA_NAME
from runtime import __version__
from runtime.agent import logs
from runtime.ops.cli import main
from runtime.ops.common import config_dir
from runtime.ops.render.commands import render_sysusers
from tests.builders import persona

REPO = Path(__file__).resolve().parent.parent
SHIPPED = ("alexa", "lior", "otto", "riven", "vera")


def _line_of(path: Path, text: str) -> int:
    return next(n for n, line in enumerate(path.read_text().splitlines(), 1) if text in line)


def _edit(path: Path, old: str, new: str) -> int:
    """Replace ``old`` (once) in the file; return the 1-based line it was on."""
    line = _line_of(path, old)
    path.write_text(path.read_text().replace(old, new, 1))
    return line


def test_help_lists_every_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for command in ("run", "validate", "personas", "render", "version"):
        assert f"\n    {command} " in out


def test_validate_passes_on_the_shipped_configuration(
        capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", str(REPO / "personas"), str(REPO / "policies")]) == 0
    assert capsys.readouterr().out == (
        "ok: 5 personas, 8 policies, fleet: built-in defaults\n")
    assert main(["validate", "--config-dir", str(REPO)]) == 0
    assert main(["validate", str(REPO)]) == 0  # a config directory, not every YAML below it


def test_validate_lists_every_error_with_file_line_and_field(
        config_copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    otto, alexa = config_copy / "personas" / "otto.yaml", config_copy / "personas" / "alexa.yaml"
    typo = _edit(otto, "displayName: Otto", "displayNme: Otto")
    scope = _edit(alexa, "- bus:vote", "- bus:vot")
    assert main(["validate", str(config_copy)]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert any(line.startswith(f"{otto}:{typo}: spec.displayNme: unknown field (did you mean "
                               "'displayName'?)") for line in lines)
    assert any(line.startswith(f"{alexa}:{scope}: spec.scopes[0]: ") and "'bus:vot'" in line
               for line in lines)
    assert lines[-1].startswith("zeta-agent: ")
    assert "Traceback" not in captured.err


def test_validate_reports_a_missing_or_empty_directory(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", str(tmp_path / "nope")]) == 1
    assert f"{tmp_path / 'nope'}: no such file or directory" in capsys.readouterr().err
    assert main(["validate", str(tmp_path)]) == 1
    assert "no persona, policy or fleet files" in capsys.readouterr().err


def test_the_config_dir_comes_from_the_flag_the_environment_or_etc() -> None:
    assert config_dir(Path("/x"), {"ZETA_CONFIG_DIR": "/y"}) == Path("/x")
    assert config_dir(None, {"ZETA_CONFIG_DIR": "/y"}) == Path("/y")
    assert config_dir(None, {}) == Path("/etc/zeta")


def test_personas_table(capsys: pytest.CaptureFixture[str],
                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ZETA_CONFIG_DIR", str(REPO))
    assert main(["personas"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["NAME", "ROLE", "TIER", "DUTIES", "SCOPES", "(beyond", "the",
                                "tier)"]
    rows = {line.split()[0]: line.split() for line in lines[1:] if not line.startswith(" ")}
    assert sorted(rows) == list(SHIPPED)
    assert rows["otto"][:5] == ["otto", "coordinator", "propose", "propose,vote,execute",
                                "k8s:nodes:cordon"]
    assert rows["riven"][1:4] == ["adversarial-reviewer", "observe", "vote,veto"]
    # Further scopes continue under the SCOPES column, one per line.
    column = lines[0].index("SCOPES")
    assert any(line[:column].strip() == "" and line[column:] == "host:units:restart:k3s.service"
               for line in lines)


def test_personas_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["personas", "--json", "--config-dir", str(REPO)]) == 0
    personas = {p["name"]: p for p in json.loads(capsys.readouterr().out)}
    assert sorted(personas) == list(SHIPPED)
    otto = personas["otto"]
    assert (otto["role"], otto["tier"], otto["duties"]) == (
        "coordinator", "propose", ["propose", "vote", "execute"])
    assert "host:units:restart:k3s.service" in otto["scopes"]
    assert "bus:propose" not in otto["scopes"]  # comes with the tier
    assert "bus:propose" in otto["effectiveScopes"]


def test_render_sysusers(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["render", "sysusers", "--config-dir", str(REPO)]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines()
             if not line.startswith("#")]
    assert lines[0] == "g zeta -"
    assert lines[1:3] == ['u zeta-alexa - "Zeta agent Alexa (foundations)" '
                          "/var/lib/zeta-agent/alexa", "m zeta-alexa zeta"]
    users = [line.split()[1] for line in lines if line.startswith("u ")]
    assert users == [f"zeta-{name}" for name in SHIPPED]
    assert [line for line in lines if line.startswith("m ")] == [
        f"m zeta-{name} zeta" for name in SHIPPED]


def test_every_valid_persona_name_fits_a_sysusers_user_name() -> None:
    # sysusers.d caps user names at 31 characters; the persona name pattern is what keeps
    # `zeta-<name>` within it, so render needs no check of its own.
    assert PERSONA_NAME.match("a" * 26)
    assert not PERSONA_NAME.match("a" * 27)
    assert f"zeta-{'a' * 26}" in render_sysusers([persona("a" * 26)], "here")
    assert len(f"zeta-{'a' * 26}") == 31


def test_render_needs_a_target(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["render"])
    assert exit_.value.code == 2
    assert "sysusers" in capsys.readouterr().err


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["version"]) == 0
    assert capsys.readouterr().out == f"zeta-agent {__version__}\n"


def test_run_an_unknown_persona(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "bob", "--config-dir", str(REPO)]) == 2
    err = capsys.readouterr().err
    assert err == (f"zeta-agent: no persona 'bob' in {REPO / 'personas'}; "
                   f"known: {', '.join(SHIPPED)}\n")


def test_run_with_a_missing_config_dir(tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["personas", "--config-dir", str(tmp_path / "nope")]) == 2
    assert capsys.readouterr().err == (
        f"zeta-agent: config directory {tmp_path / 'nope'} does not exist "
        "(pass --config-dir or set $ZETA_CONFIG_DIR)\n")


def test_run_once_ticks_once_and_logs_json(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STATE_DIRECTORY", str(tmp_path / "state"))
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert main(["run", "vera", "--config-dir", str(REPO), "--once"]) == 0
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    # No seed under the default credentials dir: the agent says so and keeps observing.
    assert [e["event"] for e in events] == [
        "bus disabled: no identity to sign with", "starting", "ready", "tick"]
    assert {e["persona"] for e in events} == {"vera"}
    assert events[-1]["tick"] == 1
    assert events[1]["not_observed"] == ["nodes", "pods", "units", "peers", "leases", "events",
                                         "budgets"]
    assert (tmp_path / "state").is_dir()


def test_logs_are_json_lines_off_a_terminal_with_context_first() -> None:
    out = io.StringIO()
    logs.configure(stream=out)
    structlog.contextvars.bind_contextvars(persona="otto", tick=3)
    structlog.get_logger().info("tick", duration_ms=4)
    structlog.get_logger().debug("hidden at info level")
    logging.getLogger("nats").warning("reconnecting to %s", "nats://a")
    logging.getLogger("nats").info("chatter")
    first, second = (json.loads(line) for line in out.getvalue().splitlines())
    assert (first["event"], first["persona"], first["tick"], first["level"]) == (
        "tick", "otto", 3, "info")
    assert first["timestamp"].endswith("Z")
    assert (second["event"], second["level"], second["persona"]) == (
        "reconnecting to nats://a", "warning", "otto")


def test_logs_can_be_forced_to_the_console_renderer() -> None:
    out = io.StringIO()
    logs.configure("console", level="debug", stream=out)
    structlog.get_logger().debug("hello", persona="otto")
    line = out.getvalue()
    assert "hello" in line
    assert "persona=otto" in line
    assert not line.startswith("{")
