"""What a careless or hostile operator finds on the command line (issue 14).

Each test first builds the broken input the issue reports and then holds the command
to a named error, an exit code from the documented scheme (0 ok, 1 findings, 2
unable), nothing half-written and no traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import stat
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest

from bus.connection import Connection
from bus.jetstream import Settings, ensure
from bus.keys import Signer, generate_user_seed
from bus.natstypes import NatsError
from lab.natsserver import NatsServer
from runtime.config.credentials import SEED_FILE
from runtime.config.files import MAX_FILE_BYTES
from runtime.config.loading import config_paths, load
from runtime.ops.cli import build_parser, main
from runtime.ops.render.nats import render_nats

REPO = Path(__file__).resolve().parent.parent
OTTO_KEY = "UAVU6MCTMJRPGFHMLWUVPDZUTOSFEKL2NRLLKZEVG574EVSST2TEX66Q"


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """``zeta-agent ARGS`` in its own process: a hang is a timeout, not a stuck suite."""
    return subprocess.run([sys.executable, "-m", "runtime", *args], capture_output=True,
                          text=True, timeout=timeout, check=False)


def errors_of(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def fleet_yaml(directory: Path, spec: str) -> Path:
    path = directory / "fleet.yaml"
    path.write_text(f"apiVersion: zeta/v1\nkind: Fleet\nspec:\n{spec}")
    return path


# ---------------------------------------------------------------- security


def test_render_nats_refuses_a_bus_without_personas(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An empty user list is no authorization at all to nats-server: refused."""
    (tmp_path / "personas").mkdir()
    (tmp_path / "policies").mkdir()
    live = tmp_path / "nats.conf"
    live.write_text("# the live file\n")
    code = main(["render", "nats", "--config-dir", str(tmp_path), "--output", str(live)])
    captured = capsys.readouterr()
    assert (code, captured.out) == (2, "")
    assert "no persona to render a bus for" in captured.err
    assert "let anyone connect" in captured.err
    assert live.read_text() == "# the live file\n", "the live file is left as it was"


# ---------------------------------------------------------------- files that are not files


def test_a_fifo_named_yaml_is_an_error_not_a_hang(config_copy: Path) -> None:
    fifo = config_copy / "policies" / "fifo.yaml"
    os.mkfifo(fifo)
    done = cli("validate", str(config_copy), timeout=30)
    assert done.returncode == 1, done.stderr
    assert f"{fifo}: not a regular file (a FIFO)" in done.stderr
    assert "Traceback" not in done.stderr
    started = cli("run", "otto", "--once", "--config-dir", str(config_copy), timeout=30)
    assert started.returncode == 2, "a configuration error: systemd must not restart it"
    assert f"{fifo}: not a regular file (a FIFO)" in started.stderr


@pytest.mark.parametrize(("make", "message"), [
    (lambda p: p.symlink_to("/dev/zero"), "not a regular file (a device)"),
    (lambda p: p.write_bytes(b"#" * (MAX_FILE_BYTES + 1)), "larger than 1024 KiB"),
    (lambda p: p.symlink_to(p.parent / "gone.yaml"), "a symlink to "),
    (lambda p: p.mkdir(), "not a regular file (a directory)"),
    (lambda p: p.write_bytes(b"kind: \xff\n"), "not UTF-8 text (byte 6)"),
], ids=["endless-device", "huge", "dangling-symlink", "directory", "not-utf8"])
def test_a_yaml_that_cannot_be_read_is_named(
        config_copy: Path, capsys: pytest.CaptureFixture[str], make: object,
        message: str) -> None:
    path = config_copy / "policies" / "broken.yaml"
    make(path)  # type: ignore[operator]
    assert main(["validate", str(config_copy)]) == 1
    assert f"{path}: {message}" in errors_of(capsys)


@pytest.mark.parametrize("make", [lambda p: p.symlink_to(p.parent / "elsewhere.yaml"),
                                  lambda p: p.mkdir()], ids=["dangling-symlink", "directory"])
def test_a_broken_fleet_yaml_is_never_replaced_by_the_defaults(
        config_copy: Path, capsys: pytest.CaptureFixture[str], make: object) -> None:
    fleet = config_copy / "fleet.yaml"
    make(fleet)  # type: ignore[operator]
    assert main(["validate", str(config_copy)]) == 1
    assert f"{fleet}: " in errors_of(capsys)
    assert main(["run", "otto", "--once", "--config-dir", str(config_copy)]) == 2
    assert f"{fleet}: " in errors_of(capsys)
    # keygen reads fleet.yaml alone (for its credentialsDir): refused too, nothing written.
    assert main(["keygen", "alice", "--config-dir", str(config_copy)]) == 2
    assert f"{fleet}: " in errors_of(capsys)


def test_an_unreadable_policies_directory_is_said_once(
        config_copy: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Root reads any directory, so its refusal is simulated where os.walk lists it.
    policies = config_copy / "policies"
    scandir = os.scandir

    def refuse(path: str | os.PathLike[str]) -> object:
        if Path(path) == policies:
            raise PermissionError(13, "Permission denied", str(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", refuse)
    assert main(["validate", str(config_copy)]) == 1
    err = errors_of(capsys)
    assert f"{policies}: cannot read the directory: Permission denied" in err
    assert "no RepairPolicy named" not in err, "the policies it holds are unknown, not missing"


# ---------------------------------------------------------------- crashes


def test_a_duration_too_large_for_python_is_a_field_error(
        config_copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    policy = config_copy / "policies" / "stale-lease.yaml"
    policy.write_text(policy.read_text().replace("cooldown: 5m", "cooldown: " + "9" * 400 + "d"))
    assert main(["validate", str(config_copy)]) == 1
    err = errors_of(capsys)
    assert f"{policy}:" in err
    assert "spec.cooldown: " in err
    assert "longer than the longest duration allowed, 3650d" in err
    assert main(["run", "lior", "--once", "--config-dir", str(config_copy)]) == 2


@pytest.mark.parametrize("command", ["audit", "watch"])
@pytest.mark.parametrize("case", [
    (b"not a seed\n", "not an nkey seed"),
    (None, "not a regular file (a device)"),
], ids=["text", "device"])
def test_a_seed_that_is_not_a_seed_is_refused_before_connecting(
        config_copy: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        command: str, case: tuple[bytes | None, str]) -> None:
    content, message = case
    seed = tmp_path / "seed"
    if content is None:
        seed.symlink_to("/dev/zero")
    else:
        seed.write_bytes(content)
    code = main([command, "--config-dir", str(config_copy), "--seed", str(seed),
                 "--bus", "nats://127.0.0.1:1"])
    assert code == 2
    assert f"the seed {seed}: {message}" in errors_of(capsys)


# ---------------------------------------------------------------- lost or half-applied


def _read_only(directory: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    """``zeta-agent ARGV`` with ``directory`` read-only, as /etc/zeta is on NixOS.

    Root writes through any mode bits, so as root the directory is bind-mounted
    read-only in a mount namespace of the command's own.
    """
    command = [sys.executable, "-m", "runtime", *argv]
    if os.geteuid() != 0:
        directory.chmod(0o555)
        return subprocess.run(command, capture_output=True, text=True, timeout=60,
                              check=False)
    if shutil.which("unshare") is None:
        pytest.fail("unshare (util-linux) is needed to mount a directory read-only")
    script = 'mount --bind -o ro "$0" "$0" && exec "$@"'
    return subprocess.run(["unshare", "-m", "sh", "-c", script, str(directory), *command],
                          capture_output=True, text=True, timeout=60, check=False)


def test_keygen_write_into_a_read_only_personas_changes_nothing(config_copy: Path) -> None:
    credentials = config_copy / "credentials"
    otto = config_copy / "personas" / "otto.yaml"
    before = otto.read_text()
    args = ("keygen", "otto", "--write", "--config-dir", str(config_copy),
            "--credentials-dir", str(credentials))
    done = _read_only(config_copy / "personas", *args)
    assert (done.returncode, done.stdout) == (2, ""), done.stderr
    assert f"cannot write {otto} (nothing was changed)" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (credentials / "otto" / SEED_FILE).exists(), "no seed without its key"
    assert otto.read_text() == before
    assert [p.name for p in otto.parent.iterdir() if p.name.startswith(".")] == []
    # Once the directory is writable, the same command works: no --force needed.
    again = cli(*args)
    assert again.returncode == 0, again.stderr
    key = again.stdout.strip()
    assert f"nkey: {key}" in otto.read_text()
    assert Signer((credentials / "otto" / SEED_FILE).read_bytes()).public_key == key


def test_a_refused_keygen_write_leaves_no_staged_file(
        config_copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    credentials = config_copy / "credentials"
    args = ["keygen", "otto", "--write", "--config-dir", str(config_copy),
            "--credentials-dir", str(credentials)]
    assert main(args) == 0
    otto = config_copy / "personas" / "otto.yaml"
    first = otto.read_text()
    assert main(args) == 2, "the seed exists: refused without --force"
    assert "--force" in errors_of(capsys)
    assert otto.read_text() == first
    assert sorted(p.name for p in otto.parent.iterdir() if p.name.startswith(".")) == []


def test_render_output_replaces_the_file_whole_or_not_at_all(
        config_copy: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    live = tmp_path / "nats.conf"
    live.write_text("# the running bus's file\n")
    live.chmod(0o640)
    render = ["render", "nats", "--config-dir", str(config_copy), "--output", str(live)]
    assert main(render) == 0
    text = live.read_text()
    assert text.startswith("# Rendered by `zeta-agent render nats`")
    assert stat.S_IMODE(live.stat().st_mode) == 0o640, "its mode is kept"
    assert capsys.readouterr().out == "", "nothing on stdout with --output"
    # A rendering that fails (a broken persona) leaves the live file as it was.
    otto = config_copy / "personas" / "otto.yaml"
    otto.write_text(otto.read_text().replace("displayName: Otto", "displayNme: Otto"))
    assert main(render) == 2
    assert "spec.displayNme: unknown field" in errors_of(capsys)
    assert live.read_text() == text
    # A directory that cannot take the file: named, exit 2.
    assert main([*render[:-1], str(tmp_path / "missing" / "nats.conf")]) == 2


@pytest.mark.parametrize("target", [["sysusers"], ["rbac", "--all"], ["polkit", "--all"],
                                    ["unit", "otto"], ["nats"]])
def test_every_render_target_writes_its_output_the_same_as_stdout(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], target: list[str]) -> None:
    base = ["render", *target, "--config-dir", str(REPO)]
    assert main(base) == 0
    printed = capsys.readouterr().out
    out = tmp_path / "out"
    assert main([*base, "-o", str(out)]) == 0
    assert out.read_text() == printed


# ---------------------------------------------------------------- accepted but wrong


@pytest.mark.parametrize(("spec", "field", "message"), [
    ("  bus:\n    urls: [localhost]\n", "spec.bus.urls[0]", "the scheme must be one of nats"),
    ("  bus:\n    urls: ['nats://127.0.0.1:99999']\n", "spec.bus.urls[0]", "the port must be"),
    ("  bus:\n    urls: ['nats://me:secret@127.0.0.1:4222']\n", "spec.bus.urls[0]",
     "holds credentials"),
    ("  bus:\n    urls: []\n", "spec.bus.urls", "at least one URL is needed"),
    ("  apiservers: ['10.0.0.1:6443']\n", "spec.apiservers[0]", "https://10.0.0.1:6443"),
    ("  apiservers: ['http://10.0.0.1:6443']\n", "spec.apiservers[0]", "must be one of https"),
    ("  bus:\n    auditMaxAge: 5m\n", "spec.bus.auditMaxAge", "at least 10m"),
    ("  bus:\n    leaseTtl: 50ms\n", "spec.bus.leaseTtl", "at least 100ms"),
])
def test_validate_refuses_fleet_settings_that_cannot_work(
        config_copy: Path, capsys: pytest.CaptureFixture[str], spec: str, field: str,
        message: str) -> None:
    fleet = fleet_yaml(config_copy, spec)
    assert main(["validate", str(config_copy)]) == 1
    line = next(ln for ln in errors_of(capsys).splitlines() if ln.startswith(f"{fleet}:"))
    assert f": {field}: " in line
    assert message in line


@pytest.mark.parametrize(("age", "accepted"), [
    (timedelta(0), True), (timedelta(minutes=10), True), (timedelta(days=3650), True),
    (timedelta(minutes=9), False), (timedelta(milliseconds=50), False)])
async def test_the_audit_max_age_validate_accepts_is_what_nats_server_accepts(
        tmp_path: Path, age: timedelta, accepted: bool) -> None:
    from pydantic import ValidationError

    from runtime.model.formats import BusSettings
    try:
        BusSettings(auditMaxAge=age)
        valid = True
    except ValidationError:
        valid = False
    with NatsServer(tmp_path / "store") as server:
        connection = Connection([server.url], name="max-age", seed=None)
        await connection.connect()
        try:
            await ensure(connection.js, Settings(max_age=age))
            created = True
        except NatsError:
            created = False
        finally:
            await connection.close()
    assert (valid, created) == (accepted, accepted)


def test_validate_refuses_an_operator_with_a_personas_key(
        config_copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fleet = fleet_yaml(config_copy, f"  operators:\n    - {{name: oncall, nkey: {OTTO_KEY}}}\n")
    assert main(["validate", str(config_copy)]) == 1
    assert (f"{fleet}:5: spec.operators[0].nkey: the same nkey as persona 'otto'"
            in errors_of(capsys))


def test_validate_refuses_a_quorum_no_set_of_voters_can_reach(
        config_copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    policy = config_copy / "policies" / "pod-crashloop.yaml"
    text = policy.read_text()
    policy.write_text(text.replace("quorum: {approvals: 2,", "quorum: {approvals: 7,"))
    assert main(["validate", str(config_copy)]) == 1
    err = errors_of(capsys)
    assert "spec.remedies[0].quorum.approvals: needs 7 approvals, but at most 5 agents" in err
    # Independent evidence a crash loop can never have: only the API server sees it.
    policy.write_text(text.replace("quorum: {approvals: 2,",
                                   "quorum: {evidence: {requires: [host]}, approvals: 2,"))
    assert main(["validate", str(config_copy)]) == 1
    assert ("quorum.evidence: asks for 1 distinct path incl. host, but a pod-crashloop "
            "finding can only be seen by apiserver") in errors_of(capsys)


def test_validate_json_lists_every_error_with_its_place(
        config_copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", "--json", str(REPO)]) == 0
    ok = json.loads(capsys.readouterr().out)
    assert ok["ok"] is True
    assert ok["errors"] == []
    assert ok["personas"] == ["alexa", "lior", "otto", "riven", "vera"]
    otto = config_copy / "personas" / "otto.yaml"
    otto.write_text(otto.read_text().replace("displayName: Otto", "displayNme: Otto"))
    assert main(["validate", "--json", str(config_copy)]) == 1
    out = json.loads(capsys.readouterr().out)
    assert out["ok"] is False
    [error] = [e for e in out["errors"] if e["field"] == "spec.displayNme"]
    line = next(n for n, text in enumerate(otto.read_text().splitlines(), 1)
                if "displayNme" in text)
    assert (error["file"], error["line"]) == (str(otto), line)
    assert error["message"].startswith("unknown field (did you mean 'displayName'?)")


# ---------------------------------------------------------------- conventions


def test_version_flag(capsys: pytest.CaptureFixture[str]) -> None:
    from runtime import __version__
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out == f"zeta-agent {__version__}\n"


def _commands(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()
              ) -> list[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    """Every subcommand, nested ones included, with its parser."""
    found = []
    for action in parser._actions:  # argparse has no public walk
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found.append(((*prefix, name), sub))
                found += _commands(sub, (*prefix, name))
    return found


def test_every_command_documents_its_exit_codes_in_help_and_in_the_docs() -> None:
    commands = _commands(build_parser())
    assert len(commands) > 20
    operations = (REPO / "docs" / "operations.md").read_text()
    assert "### Exit codes" in operations
    for command, parser in commands:
        epilog = parser.epilog or ""
        assert epilog.startswith("exit status: 0 success;"), command
        assert "2 bad usage" in epilog
        if "; 1 " in epilog:
            assert f"`zeta-agent {' '.join(command)}`" in operations, (
                f"{command}: its exit status 1 is not in docs/operations.md")
        for action in parser._actions:
            if "--bus" in action.option_strings:
                assert "$ZETA_NATS_URL" in (action.help or ""), command


@pytest.mark.parametrize("shell", ["bash", "zsh"])
def test_completion_scripts_cover_every_command(
        capsys: pytest.CaptureFixture[str], shell: str) -> None:
    assert main(["completion", shell]) == 0
    script = capsys.readouterr().out
    for name in ("validate", "render", "keygen", "breaker-reset", "--config-dir"):
        assert name in script
    if shell == "bash":
        checked = subprocess.run(["bash", "-n"], input=script, text=True,
                                 capture_output=True, check=False)
        assert checked.returncode == 0, checked.stderr


async def test_audit_with_a_key_the_bus_refuses_says_so(
        config_copy: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    conf = tmp_path / "nats.conf"
    conf.write_text(render_nats(load(config_paths(config_copy)), listen="127.0.0.1:4222",
                                store_dir=None))
    stranger = tmp_path / "stranger.seed"
    stranger.write_bytes(generate_user_seed())
    with NatsServer(tmp_path / "store", config=conf) as server:
        code = await asyncio.to_thread(main, [
            "audit", "--config-dir", str(config_copy), "--bus", server.url, "--seed",
            str(stranger), "--timeout", "2"])
    err = errors_of(capsys)
    assert code == 2
    assert f"the bus at {server.url} refused the credentials" in err
    assert "cannot reach the bus" not in err


# ---------------------------------------------------------------- the journal


def _journal_env(path: Path) -> dict[str, str]:
    """The environment systemd gives a unit whose output goes to ``path``'s stream."""
    status = path.stat()
    return {**os.environ, "JOURNAL_STREAM": f"{status.st_dev}:{status.st_ino}"}


def test_each_record_reaches_the_journal_at_its_own_priority(tmp_path: Path) -> None:
    out = tmp_path / "stream"
    out.touch()
    script = ("import structlog; from runtime.agent import logs; logs.configure('json'); "
              "log = structlog.get_logger('t'); log.info('fine', n=1); "
              "log.warning('hmm'); log.error('broken', n=2); "
              "import logging; logging.getLogger('nats').error('library error')")
    with out.open("w") as stream:
        subprocess.run([sys.executable, "-c", script], stdout=stream, env=_journal_env(out),
                       check=True, timeout=30)
    lines = out.read_text().splitlines()
    assert [line[:3] for line in lines] == ["<6>", "<4>", "<3>", "<3>"]
    assert json.loads(lines[2][3:])["n"] == 2, "the structured fields are kept"
    # Redirected elsewhere (not the stream systemd connected), nothing is prefixed.
    plain = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                           env=_journal_env(out), check=True, timeout=30)
    assert plain.stdout.startswith("{")


def test_start_up_errors_and_crashes_are_errors_in_the_journal(
        config_copy: Path, tmp_path: Path) -> None:
    err = tmp_path / "stderr"
    err.touch()
    otto = config_copy / "personas" / "otto.yaml"
    otto.write_text(otto.read_text().replace("displayName: Otto", "displayNme: Otto"))
    with err.open("w") as stream:
        done = subprocess.run([sys.executable, "-m", "runtime", "run", "otto", "--config-dir",
                               str(config_copy)], stderr=stream, env=_journal_env(err),
                              timeout=60, check=False)
    assert done.returncode == 2
    lines = err.read_text().splitlines()
    assert lines
    assert all(line.startswith("<3>") for line in lines), lines
    # An exception nothing caught: one critical record holding the traceback.
    out = tmp_path / "stdout"
    out.touch()
    script = ("from runtime.agent import logs; logs.configure('json'); logs.log_uncaught(); "
              "raise RuntimeError('boom')")
    with out.open("w") as stream:
        crashed = subprocess.run([sys.executable, "-c", script], stdout=stream,
                                 env=_journal_env(out), timeout=30, check=False)
    assert crashed.returncode == 1
    [line] = out.read_text().splitlines()
    assert line.startswith("<2>")
    record = json.loads(line[3:])
    assert record["event"] == "agent crashed"
    assert "RuntimeError: boom" in record["exception"]


def test_a_bus_url_that_is_not_one_is_refused_on_the_command_line_and_in_the_environment(
        config_copy: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["audit", "--config-dir", str(config_copy), "--bus", "localhost:4222"])
    assert exit_.value.code == 2
    assert "argument --bus: expected a URL like nats://" in errors_of(capsys)
    monkeypatch.setenv("ZETA_NATS_URL", "nats://127.0.0.1:4222,127.0.0.1:4223")
    assert main(["run", "otto", "--once", "--config-dir", str(config_copy)]) == 2
    assert "$ZETA_NATS_URL: expected a URL like nats://" in errors_of(capsys)
    assert main(["audit", "--config-dir", str(config_copy)]) == 2
    assert "$ZETA_NATS_URL: " in errors_of(capsys)
