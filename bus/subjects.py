"""Names on the bus: persona names and the subjects built from them (docs/bus.md)."""

from __future__ import annotations

import re
from dataclasses import dataclass

PERSONA_NAME = re.compile(r"^[a-z][a-z0-9-]{0,25}$")
"""A persona name is also a NATS subject token, a systemd instance name and part of
an OS user name (``zeta-<name>``, which sysusers.d caps at 31 characters), hence the
tight alphabet and the 26-character limit."""


def inbox(persona: str) -> str:
    """The reply-subject prefix of a persona's connection.

    Each persona gets its own, so the bus can let it read only the replies meant for
    it: with the shared ``_INBOX`` any persona could read every JetStream answer.
    """
    return f"_INBOX_{persona}"


def heartbeat(persona: str) -> str:
    return f"zeta.agent.{persona}.heartbeat"


def finding(persona: str) -> str:
    return f"zeta.agent.{persona}.finding"


def proposed(repair: str) -> str:
    return f"zeta.repair.{repair}.proposed"


def vote(repair: str, persona: str) -> str:
    return f"zeta.repair.{repair}.vote.{persona}"


def decided(repair: str) -> str:
    return f"zeta.repair.{repair}.decided"


def started(repair: str) -> str:
    return f"zeta.repair.{repair}.started"


def result(repair: str) -> str:
    return f"zeta.repair.{repair}.result"


def control(verb: str) -> str:
    return f"zeta.control.{verb}"


@dataclass(frozen=True)
class Route:
    """What a subject promises about the message on it."""

    kind: str
    sender: str | None = None  # None: the subject does not name the sender
    repair: str | None = None


_REPAIR_KINDS = {"proposed": "proposal", "decided": "decision", "started": "started",
                 "result": "result"}


def parse(subject: str) -> Route | None:
    """The kind, sender and repair a subject stands for; None for a subject outside the contract."""
    parts = subject.split(".")
    if len(parts) == 4 and parts[:2] == ["zeta", "agent"] and parts[3] in ("heartbeat", "finding"):
        return Route(parts[3], sender=parts[2]) if PERSONA_NAME.match(parts[2]) else None
    if len(parts) >= 4 and parts[:2] == ["zeta", "repair"]:
        repair = parts[2]
        if len(parts) == 4 and parts[3] in _REPAIR_KINDS:
            return Route(_REPAIR_KINDS[parts[3]], repair=repair)
        if len(parts) == 5 and parts[3] == "vote" and PERSONA_NAME.match(parts[4]):
            return Route("vote", sender=parts[4], repair=repair)
        return None
    if len(parts) == 3 and parts[:2] == ["zeta", "control"]:
        return Route("control")
    return None
