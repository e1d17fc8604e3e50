"""Shared by the operator commands: the config directory, user mistakes as
messages and exit codes, the bus URLs and seeds a command is given.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

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


class UserError(Exception):
    """A mistake the user can fix; ``lines`` (if any) are printed before the message."""

    def __init__(self, message: str, *, lines: Sequence[str] = (), code: int = 2) -> None:
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


def bus_urls_of(args: argparse.Namespace, config: ConfigSet) -> list[str]:
    """--bus, else $ZETA_NATS_URL, else fleet.yaml: the same order as the agents use."""
    return list(args.bus or bus_urls(config))


def read_seed(path: Path | None) -> bytes | None:
    if path is None:
        return None
    try:
        return path.read_bytes()
    except OSError as exc:
        raise UserError(f"cannot read the seed {path}: {exc.strerror or exc}") from None


def fleet_of(directory: Path) -> Fleet:
    """fleet.yaml alone (defaults without one): a broken persona file must not stop keygen."""
    fleet_file = directory / "fleet.yaml"
    if not fleet_file.exists():
        return DEFAULT_FLEET
    try:
        return load([fleet_file]).fleet
    except ConfigInvalidError as exc:
        raise config_errors(exc.errors, str(fleet_file), code=2) from None


Handler = Callable[[argparse.Namespace], int]


def dispatch(prog: str, handler: Handler, args: argparse.Namespace) -> int:
    """Run one command's handler: a UserError is printed as ``prog: message`` with its exit
    code, never as a traceback; Ctrl-C is 130."""
    try:
        return handler(args)
    except UserError as exc:
        for line in exc.lines:
            print(line, file=sys.stderr)
        print(f"{prog}: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        return 130
