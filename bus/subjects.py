"""Names on the bus: persona names and the subjects built from them (docs/bus.md)."""

from __future__ import annotations

import re

PERSONA_NAME = re.compile(r"^[a-z][a-z0-9-]{0,30}$")
"""A persona name is also a NATS subject token, a systemd instance name and part of
an OS user name (``zeta-<name>``, at most 32 characters), hence the tight alphabet."""


def heartbeat(persona: str) -> str:
    return f"zeta.agent.{persona}.heartbeat"


def finding(persona: str) -> str:
    return f"zeta.agent.{persona}.finding"
