"""``zeta-agent render …``: the system files rendered from the persona files, on stdout
or written whole into ``--output FILE``.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from runtime.model.formats import Persona
from runtime.ops.common import UserError, config_dir, emit, load_config_dir, persona_in
from runtime.ops.render import nats as permissions
from runtime.ops.render import rbac
from runtime.ops.render import units as rendering

SYSUSERS_GROUP = "zeta"


DEFAULT_NATS_LISTEN = "127.0.0.1:4222"


DEFAULT_NATS_STORE = Path("/var/lib/zeta-bus")


def render_sysusers(personas: Sequence[Persona], source: str) -> str:
    """A sysusers.d(5) file: the ``zeta`` group and one static system user per persona."""
    lines = [
        f"# Rendered by `zeta-agent render sysusers` from {source}; do not edit.",
        "# Static users, not DynamicUser=: polkit rules name each persona's user, and a",
        "# dynamic user could not even reach the system bus (ARCHITECTURE.md, Deployment).",
        "# Each user has its own primary group; the zeta group collects them all, so shared",
        "# files such as /etc/zeta can be made readable to the agents and nobody else.",
        f"g {SYSUSERS_GROUP} -",
    ]
    for persona in sorted(personas, key=lambda p: p.name):
        user = f"zeta-{persona.name}"
        gecos = "".join(c for c in f"Zeta agent {persona.spec.displayName} ({persona.spec.role})"
                        if c not in '":\\\n')
        lines += [f'u {user} - "{gecos}" /var/lib/zeta-agent/{persona.name}',
                  f"m {user} {SYSUSERS_GROUP}"]
    return "\n".join(lines) + "\n"


def render_sysusers_command(args: argparse.Namespace) -> int:
    directory = config_dir(args.config_dir)
    config = load_config_dir(directory)
    emit(render_sysusers([p.value for p in config.personas.values()], str(directory)),
         args.output)
    return 0


def render_nats_command(args: argparse.Namespace) -> int:
    directory = config_dir(args.config_dir)
    config = load_config_dir(directory)
    try:
        text = permissions.render_nats(config, listen=args.listen,
                                       store_dir=str(args.store_dir), source=str(directory))
    except permissions.UnsafeBusError as exc:
        raise UserError(str(exc)) from None
    emit(text, args.output)
    return 0


def render_rbac_command(args: argparse.Namespace) -> int:
    directory = config_dir(args.config_dir)
    config = load_config_dir(directory)
    emit(rbac.render_all(p.value for p in config.personas.values()) if args.all
         else rbac.render_rbac(persona_in(config, args.persona, directory)), args.output)
    return 0


def render_polkit_command(args: argparse.Namespace) -> int:
    directory = config_dir(args.config_dir)
    config = load_config_dir(directory)
    personas = ([p.value for _, p in sorted(config.personas.items())] if args.all
                else [persona_in(config, args.persona, directory)])
    emit(rendering.render_polkit(((p, config.policies_of(p)) for p in personas),
                                 source=str(directory),
                                 filename=rendering.polkit_file(args.persona)), args.output)
    return 0


def render_unit_command(args: argparse.Namespace) -> int:
    directory = config_dir(args.config_dir)
    config = load_config_dir(directory)
    persona = persona_in(config, args.persona, directory)
    credentials = args.credentials_dir or Path(config.fleet.spec.credentialsDir)
    emit(rendering.render_unit(persona, credentials_dir=credentials, source=str(directory)),
         args.output)
    return 0
