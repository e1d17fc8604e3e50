"""``zeta-agent run``: one persona's agent in the foreground, as its systemd unit runs it.
"""

from __future__ import annotations

import argparse

from runtime.agent import logs, wiring
from runtime.agent import loop as agent
from runtime.ops.common import UserError, bus_urls_of, config_dir, load_config_dir, persona_in


def run_command(args: argparse.Namespace) -> int:
    directory = config_dir(args.config_dir)
    config = load_config_dir(directory)
    persona = persona_in(config, args.persona, directory)
    bus_urls_of(None, config)  # a bad $ZETA_NATS_URL is a start-up error (exit 2), not a crash
    try:
        state_dir = agent.state_directory(persona.name)
    except OSError as exc:
        raise UserError(f"cannot create the state directory: {exc}") from None
    logs.configure(args.log_format, level=args.log_level)
    logs.log_uncaught()
    return wiring.serve(config, persona.name, state_dir=state_dir, once=args.once)
