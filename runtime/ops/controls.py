"""What an operator does by hand: make keys, and freeze, thaw or reset a breaker fleet-wide.

Keys: ``zeta-agent keygen NAME`` writes a fresh seed where the agents look for it
(``runtime.config.credentials.write_seed``) and can put the public key into the persona
file. That edit replaces the one value and leaves every other byte, so the comments
and layout the operator wrote survive.

Controls: a ``freeze``, ``thaw`` or ``breaker-reset`` is an envelope signed with an
operator's key, published on ``zeta.control.<verb>`` into the audit stream. Before
signing, the seed is checked against the key fleet.yaml lists for that operator:
agents would drop a control signed with any other key, and an operator must learn
that now, not from a fleet that silently did not freeze.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import socket
import sys
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

from pydantic import ValidationError
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap
from ruamel.yaml.error import YAMLError

from bus.connection import BusUnavailableError, Connection, subject_for
from bus.envelope import Envelope, seal
from bus.jetstream import AUDIT_STREAM, Settings, check, ensure
from bus.keys import Signer, generate_user_seed
from bus.messages import Control
from bus.natstypes import NatsError
from bus.subjects import PERSONA_NAME
from runtime.agent import logs
from runtime.agent.link import jetstream_settings
from runtime.config.credentials import CredentialError, seed_file, write_seed
from runtime.config.files import Staged
from runtime.model.durations import format_duration
from runtime.model.formats import Fleet
from runtime.ops.common import (
    UserError,
    bus_urls_of,
    config_dir,
    connect_within,
    fleet_of,
    load_config_dir,
    read_seed,
)

# `nkey:` and the scalar after it: quoted, or plain up to a space, a comment or the
# end of a flow mapping (possibly empty, for a file waiting for its first key).
_NKEY = re.compile(r"nkey[ \t]*:(?P<space>[ \t]*)(?P<value>\"[^\"]*\"|'[^']*'|[^\s,#}\]]*)")


MAX_PAUSE = timedelta(days=7)


class OperatingError(Exception):
    """A refusal the operator can fix; nothing was sent or changed."""


class NotSentError(OperatingError):
    """The bus could not be reached, or did not store the control."""


# ---------------------------------------------------------------- keys


def persona_file(config_dir: Path, name: str) -> Path:
    """Where persona ``name`` is defined: the file name is the systemd instance name."""
    return config_dir / "personas" / f"{name}.yaml"


def _nkey_position(text: str, where: Path) -> tuple[int, int]:
    """0-based line and column of the key ``nkey`` under ``spec.identity``."""
    try:
        doc = YAML(typ="rt").load(text)
        identity = doc["spec"]["identity"]
        if not isinstance(identity, CommentedMap) or "nkey" not in identity:
            raise KeyError("nkey")
        line, column = identity.lc.key("nkey")
    except YAMLError as exc:
        raise OperatingError(f"{where}: not valid YAML: {exc}") from None
    except (KeyError, TypeError):
        raise OperatingError(f"{where}: no spec.identity.nkey to replace; add "
                             "`nkey:` under spec.identity first") from None
    return int(line), int(column)


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise OperatingError(f"cannot read {path}: {exc.strerror or exc}") from None


def with_persona_key(path: Path, key: str) -> str:
    """The text of ``path`` with the value of ``spec.identity.nkey`` replaced, nothing else."""
    text = _read(path)
    line, column = _nkey_position(text, path)
    lines = text.splitlines(keepends=True)
    found = _NKEY.match(lines[line], column)
    if found is not None:
        rest = lines[line][found.end():]
        space = found["space"] or " "  # `nkey:KEY` would be one plain scalar
        lines[line] = (lines[line][:found.start("space")] + space + key
                       + (" " if rest.startswith("#") else "") + rest)
    updated = "".join(lines)
    if found is None or _nkey_of(updated) != key:
        raise OperatingError(f"{path}: could not replace the nkey on line {line + 1}; "
                             f"put {key} there by hand")
    return updated


def _nkey_of(text: str) -> object:
    try:
        return YAML(typ="rt").load(text)["spec"]["identity"]["nkey"]
    except (YAMLError, KeyError, TypeError):
        return None


def keygen(name: str, *, credentials_dir: Path, persona: Path | None = None,
           force: bool = False) -> str:
    """Write a new seed for ``name``; with ``persona``, put its public key in that file.

    The new persona file is written beside the old one before the seed is written
    (a read-only ``personas/``, as on NixOS, is refused with nothing changed), and
    renamed into place after it. Returns the public key.
    """
    seed = generate_user_seed()
    key = Signer(seed).public_key
    staged: Staged | None = None
    if persona is not None:
        text = with_persona_key(persona, key).encode("utf-8")
        try:
            staged = Staged(persona, text, mode=persona.stat().st_mode & 0o7777)
        except OSError as exc:
            raise OperatingError(f"cannot write {persona} (nothing was changed): "
                                 f"{exc.strerror or exc}; without --write, keygen prints "
                                 "the key to put there by other means") from None
    try:
        write_seed(credentials_dir, name, force=force, seed=seed)
    except (CredentialError, OSError) as exc:
        if staged is not None:
            staged.discard()
        if isinstance(exc, CredentialError):
            raise OperatingError(str(exc)) from None
        raise OperatingError(f"cannot write a seed under {credentials_dir} (nothing was "
                             f"changed): {exc.strerror or exc}") from None
    if staged is not None:
        try:
            staged.commit()
        except OSError as exc:
            raise OperatingError(f"wrote {seed_file(credentials_dir, name)}, but could not "
                                 f"update {persona}: {exc.strerror or exc}; put {key} in "
                                 "its spec.identity.nkey by hand") from None
    return key


# ---------------------------------------------------------------- controls


def operator_signer(fleet: Fleet, operator: str, seed: bytes, source: Path) -> Signer:
    """The operator's signing key, refused unless fleet.yaml lists it for ``operator``.

    ``source`` (where ``seed`` was read) only names the file in refusals.
    """
    configured = {user.name: user.nkey for user in fleet.spec.operators}
    if operator not in configured:
        known = ", ".join(sorted(configured)) or "none"
        raise OperatingError(f"{operator!r} is not an operator in fleet.yaml (operators: "
                             f"{known}); agents would drop its controls")
    try:
        signer = Signer(seed)
    except ValueError as exc:
        raise OperatingError(f"{source}: {exc}") from None
    if signer.public_key != configured[operator]:
        raise OperatingError(
            f"{source} holds the key {signer.public_key}, but fleet.yaml lists "
            f"{configured[operator]} for operator {operator!r}: refusing to sign")
    return signer


def control(verb: str, *, operator: str, signer: Signer, reason: str, policy: str | None,
            host: str, until: datetime | None = None) -> Envelope:
    """The signed control envelope; OperatingError if ``Control`` refuses the verb or reason."""
    try:
        body = Control.model_validate({"verb": verb, "reason": reason, "policy": policy,
                                       "until": until})
    except ValidationError as exc:
        raise OperatingError("; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}"
                                       for e in exc.errors())) from None
    return seal("control", sender=operator, host=host, body=body, signer=signer)


async def send(envelope: Envelope, *, urls: Sequence[str], seed: bytes, settings: Settings,
               within: float) -> list[str]:
    """Publish ``envelope`` into the audit stream (created if missing), as the user of ``seed``.

    Returns the audit resources' settings that differ from ``settings`` (the control
    is stored all the same: a freeze must not wait for a settings dispute).
    """
    connection = Connection(urls, name=f"zeta-agent control ({envelope.sender})", seed=seed)
    try:
        await connect_within(connection, within, urls, NotSentError)
        async with asyncio.timeout(within):
            problems = await ensure(connection.js, settings)
            await connection.publish(subject_for(envelope), envelope)
    except (TimeoutError, BusUnavailableError, NatsError) as exc:
        raise NotSentError(f"the bus did not store the control: {exc or type(exc).__name__} "
                           "(a permissions violation shows in the nats-server log)") from None
    finally:
        await connection.close()
    return problems


async def bus_resources(action: str, *, urls: Sequence[str], seed: bytes | None,
                        settings: Settings, within: float) -> list[str]:
    """``zeta-agent bus init|check``: what differs from ``settings`` after it.

    Only this (an operator's command) creates the resources; the rendered permissions
    let no persona do it, and nobody change them.
    """
    connection = Connection(urls, name=f"zeta-agent bus {action}", seed=seed)
    run = {"init": ensure, "check": check}[action]
    try:
        await connect_within(connection, within, urls, NotSentError)
        async with asyncio.timeout(within):
            return await run(connection.js, settings)
    except (TimeoutError, BusUnavailableError, NatsError) as exc:
        raise NotSentError(f"the bus did not answer: {exc or type(exc).__name__} (a "
                           "permissions violation shows in the nats-server log)") from None
    finally:
        await connection.close()


# ---------------------------------------------------------------- the command


def keygen_command(args: argparse.Namespace) -> int:
    name: str = args.name
    if not PERSONA_NAME.match(name):
        raise UserError(f"{name!r} is not a valid name: lowercase letters, digits and '-', "
                        "starting with a letter, at most 26 characters")
    directory = config_dir(args.config_dir)
    persona = persona_file(directory, name) if args.write else None
    if persona is not None and not persona.is_file():
        raise UserError(f"--write needs the persona file {persona}, which does not exist "
                        "(without --write, keygen makes a key for any name, e.g. an operator)")
    credentials = args.credentials_dir or Path(fleet_of(directory).spec.credentialsDir)
    try:
        key = keygen(name, credentials_dir=credentials, persona=persona,
                               force=args.force)
    except OperatingError as exc:
        raise UserError(str(exc)) from None
    # The key alone on stdout, so `KEY=$(zeta-agent keygen …)` works; the rest is for people.
    print(f"wrote {seed_file(credentials, name)} (mode 0600)", file=sys.stderr)
    if persona is not None:
        print(f"set spec.identity.nkey in {persona}", file=sys.stderr)
    print(key)
    return 0


def control_command(args: argparse.Namespace) -> int:
    directory = config_dir(args.config_dir)
    config = load_config_dir(directory)
    policy: str | None = getattr(args, "policy", None)
    if policy is not None and policy not in config.policies:
        known = ", ".join(sorted(config.policies)) or "none"
        raise UserError(f"no policy {policy!r} in {directory / 'policies'}; known: {known}")
    duration: timedelta | None = getattr(args, "duration", None)
    if duration is not None and not timedelta(0) < duration <= MAX_PAUSE:
        raise UserError(f"--for must be more than 0s and at most {format_duration(MAX_PAUSE)}: "
                        "a longer hold is a freeze, which someone must lift")
    until = datetime.now(UTC) + duration if duration is not None else None
    fleet = config.fleet.spec
    seed_path = args.seed or seed_file(Path(fleet.credentialsDir), args.operator)
    seed = read_seed(seed_path) or b""
    urls = bus_urls_of(args, config)
    # Bus reconnect warnings go to stderr: stdout says what was sent.
    logs.configure(level="warning", stream=sys.stderr)
    try:
        signer = operator_signer(config.fleet, args.operator, seed, seed_path)
        envelope = control(args.verb, operator=args.operator, signer=signer,
                           reason=args.reason, policy=policy, host=socket.gethostname(),
                           until=until)
        problems = asyncio.run(send(
            envelope, urls=urls, seed=seed, within=args.timeout,
            settings=jetstream_settings(config)))
    except NotSentError as exc:
        raise UserError(str(exc)) from None
    except OperatingError as exc:
        raise UserError(str(exc)) from None
    for problem in problems:
        print(f"warning: {problem}", file=sys.stderr)
    print(f"sent {args.verb} as operator {args.operator} on {subject_for(envelope)} "
          f"to {', '.join(urls)}")
    print(envelope.to_bytes().decode("utf-8"))
    return 0


def bus_resources_command(args: argparse.Namespace) -> int:
    config = load_config_dir(config_dir(args.config_dir))
    seed: bytes | None = None
    if args.seed is not None or args.operator is not None:
        seed_path = args.seed or seed_file(Path(config.fleet.spec.credentialsDir), args.operator)
        seed = read_seed(seed_path)
    urls = bus_urls_of(args, config)
    logs.configure(level="warning", stream=sys.stderr)
    try:
        problems = asyncio.run(bus_resources(
            args.action, urls=urls, seed=seed, settings=jetstream_settings(config),
            within=args.timeout))
    except NotSentError as exc:
        raise UserError(str(exc)) from None
    for problem in problems:
        print(problem)
    if problems:
        print(f"{len(problems)} difference(s): agents refuse destructive work until the "
              "bus's administrator fixes them (docs/operations.md)", file=sys.stderr)
        return 1
    print(f"{AUDIT_STREAM} and the lease bucket are as fleet.yaml says", file=sys.stderr)
    return 0
