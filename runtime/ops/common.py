"""Shared by the operator commands: the config directory, user mistakes as
messages and exit codes, the bus URLs and seeds a command is given.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from bus.connection import Connection
from bus.keys import Signer
from runtime.agent import logs
from runtime.config.credentials import SEED_LIMIT
from runtime.config.files import UnreadableError, read_regular, write_atomic
from runtime.config.loading import (
    ConfigError,
    ConfigInvalidError,
    ConfigSet,
    bus_urls,
    config_paths,
    load,
)
from runtime.model.formats import DEFAULT_FLEET, Fleet, Persona

CONFIG_ENV = "ZETA_CONFIG_DIR"


DEFAULT_CONFIG_DIR = Path("/etc/zeta")


EXIT_OK = 0
EXIT_FINDINGS = 1
EXIT_UNABLE = 2
EXIT_INTERRUPTED = 130


def exit_codes(findings: str | None = None) -> str:
    """The ``--help`` epilog naming a command's exit codes: the same scheme everywhere."""
    one = f" {EXIT_FINDINGS} {findings};" if findings else ""
    return (f"exit status: {EXIT_OK} success;{one} {EXIT_UNABLE} bad usage, a configuration "
            f"that does not load, a file that cannot be read or written, or a bus that cannot "
            f"be reached; {EXIT_INTERRUPTED} interrupted (docs/operations.md, Exit codes)")


class UserError(Exception):
    """A mistake the user can fix; ``lines`` (if any) are printed before the message."""

    def __init__(self, message: str, *, lines: Sequence[str] = (),
                 code: int = EXIT_UNABLE) -> None:
        super().__init__(message)
        self.lines = tuple(lines)
        self.code = code


def config_dir(flag: Path | None, environ: Mapping[str, str] = os.environ) -> Path:
    """``--config-dir``, else ``$ZETA_CONFIG_DIR``, else /etc/zeta."""
    if flag is not None:
        return flag
    return Path(environ[CONFIG_ENV]) if environ.get(CONFIG_ENV) else DEFAULT_CONFIG_DIR


def is_config_dir(path: Path) -> bool:
    return (path / "personas").is_dir() or (path / "policies").is_dir()


def config_errors(errors: Sequence[ConfigError], where: str, *, code: int) -> UserError:
    return UserError(f"{len(errors)} error(s) in the configuration under {where}",
                     lines=[str(e) for e in errors], code=code)


def load_config_dir(directory: Path) -> ConfigSet:
    """Load a config directory, or raise UserError listing every problem."""
    if not directory.is_dir():
        raise UserError(f"config directory {directory} does not exist "
                        f"(pass --config-dir or set ${CONFIG_ENV})")
    try:
        return load(config_paths(directory))
    except ConfigInvalidError as exc:
        raise config_errors(exc.errors, str(directory), code=2) from None


def persona_in(config: ConfigSet, name: str, directory: Path) -> Persona:
    if name not in config.personas:
        known = ", ".join(sorted(config.personas)) or "none"
        raise UserError(f"no persona {name!r} in {directory / 'personas'}; known: {known}")
    return config.persona(name)


def bus_urls_of(args: argparse.Namespace | None, config: ConfigSet) -> list[str]:
    """--bus, else $ZETA_NATS_URL, else fleet.yaml: the same order as the agents use."""
    if args is not None and args.bus:
        return list(args.bus)
    try:
        return list(bus_urls(config))
    except ValueError as exc:
        raise UserError(str(exc)) from None


async def connect_within(connection: Connection, seconds: float, urls: Sequence[str],
                         error: Callable[[str], Exception] = UserError) -> None:
    """Connect, or raise ``error`` after ``seconds`` saying why as well as we know.

    ``Connection.connect`` retries forever, as an agent must; a command run by a
    person has to give up and say so, and a key the server refused is not a bus
    that is down.
    """
    try:
        async with asyncio.timeout(seconds):
            await connection.connect()
    except TimeoutError:
        where = ", ".join(urls)
        if connection.refused is not None:
            raise error(f"the bus at {where} refused the credentials ({connection.refused}): "
                        "is this key a user in the nats.conf the server runs (re-render it "
                        "with `zeta-agent render nats` after adding one)?") from None
        raise error(f"cannot reach the bus at {where} within {seconds:g}s "
                    "(is it running, and is the address right?)") from None


def read_seed(path: Path | None) -> bytes | None:
    """The nkey seed in ``path`` (None without one), checked to be a seed before use."""
    if path is None:
        return None
    try:
        seed = read_regular(path, SEED_LIMIT)
        Signer(seed)
    except UnreadableError as exc:
        raise UserError(f"the seed {path}: {exc}") from None
    except ValueError as exc:
        raise UserError(f"the seed {path}: {exc}") from None
    return seed


def fleet_of(directory: Path) -> Fleet:
    """fleet.yaml alone (defaults without one): a broken persona file must not stop keygen."""
    fleet_file = directory / "fleet.yaml"
    if not os.path.lexists(fleet_file):
        return DEFAULT_FLEET
    try:
        return load([fleet_file]).fleet
    except ConfigInvalidError as exc:
        raise config_errors(exc.errors, str(fleet_file), code=2) from None


def emit(text: str, output: Path | None) -> None:
    """``text`` on stdout, or into ``output`` whole: a failed render never truncates a live file.

    An existing file keeps its permission bits; a new one is 0644 (rendered files
    hold public keys and rules, no secrets).
    """
    if output is None:
        print(text, end="")
        return
    try:
        mode = output.stat().st_mode & 0o7777 if output.exists() else 0o644
        write_atomic(output, text.encode("utf-8"), mode=mode)
    except OSError as exc:
        raise UserError(f"cannot write {output} (left as it was): "
                        f"{exc.strerror or exc}") from None


Handler = Callable[[argparse.Namespace], int]


def dispatch(prog: str, handler: Handler, args: argparse.Namespace) -> int:
    """Run one command's handler: a UserError is printed as ``prog: message`` with its exit
    code, never as a traceback; Ctrl-C is 130."""
    try:
        return handler(args)
    except UserError as exc:
        # Under systemd (`run`), the journal files these at priority err.
        journal = logs.is_journal(sys.stderr)
        for line in [*exc.lines, f"{prog}: {exc}"]:
            print(logs.journal_line(3, line) if journal else line, file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
