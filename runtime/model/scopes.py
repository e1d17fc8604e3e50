"""Scopes: what a persona may do, declared once and checked everywhere (default deny).

A scope is ``domain:segment[:segment[:segment]]``, for example ``k8s:nodes:cordon``,
``host:units:restart:k3s.service`` or ``bus:vote``. A granted ``*`` matches exactly one
whole segment; there are no partial globs and no implied trailing segments, so
``host:units:restart`` grants nothing on ``host:units:restart:k3s.service``. Pure
functions only: the same code answers the runtime check and renders RBAC, polkit and
NATS permissions.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from enum import StrEnum

DOMAINS = ("k8s", "host", "agent", "bus")
_SEGMENT = re.compile(r"^(\*|[a-z0-9][a-z0-9-]*)$")
# The last segment of host and agent scopes names a unit or persona: unit names
# carry dots and '@' (zeta-agent@otto.service).
_SELECTOR = re.compile(r"^(\*|[A-Za-z0-9][A-Za-z0-9@._-]*)$")

K8S_READABLE = (
    "nodes", "pods", "leases", "events", "deployments", "statefulsets", "daemonsets",
    "replicasets", "poddisruptionbudgets", "namespaces",
)
RESTARTABLE_WORKLOADS = ("deployments", "statefulsets", "daemonsets")

# Everything a daemon can be granted. `*` here means "any value is meaningful"
# (a unit name, a persona). A granted scope must fit one of these, so a typo such
# as `k8s:nodes:cordn` is an error instead of a silent grant of nothing.
VOCABULARY: tuple[str, ...] = (
    *(f"k8s:{r}:read" for r in K8S_READABLE),
    "k8s:nodes:cordon", "k8s:nodes:uncordon", "k8s:nodes:drain", "k8s:pods:delete",
    *(f"k8s:{w}:restart" for w in RESTARTABLE_WORKLOADS),
    "host:units:read", "host:node:read", "host:units:start:*", "host:units:restart:*",
    "host:node:reboot",
    "agent:peers:read", "agent:peers:restart:*",
    "bus:report", "bus:propose", "bus:vote", "bus:veto", "bus:escalate", "bus:leases:release",
)


class ScopeError(ValueError):
    """A scope string that does not follow the grammar or names nothing known."""


def parse(scope: str) -> tuple[str, ...]:
    """Split and check a scope against the grammar; raise ScopeError saying what is wrong."""
    parts = tuple(scope.split(":"))
    if not 2 <= len(parts) <= 4:
        raise ScopeError(
            f"{scope!r}: expected domain:resource:verb[:selector] (2 to 4 segments), "
            f"got {len(parts)}"
        )
    if parts[0] not in DOMAINS:
        raise ScopeError(f"{scope!r}: unknown domain {parts[0]!r}, expected one of {DOMAINS}")
    for index, part in enumerate(parts[1:], start=1):
        pattern = _SELECTOR if index == 3 else _SEGMENT
        if not pattern.match(part):
            raise ScopeError(
                f"{scope!r}: segment {index + 1} {part!r} must be '*' or "
                + ("a unit/persona name" if index == 3 else "lowercase letters, digits, '-'")
            )
    return parts


def segments_match(granted: tuple[str, ...], required: tuple[str, ...]) -> bool:
    """True when every granted segment equals the required one or is ``*``."""
    return len(granted) == len(required) and all(
        g in ("*", r) for g, r in zip(granted, required, strict=True)
    )


def _overlaps(a: tuple[str, ...], b: tuple[str, ...]) -> bool:
    return len(a) == len(b) and all(
        "*" in (x, y) or x == y for x, y in zip(a, b, strict=True)
    )


def check_known(scope: str) -> str:
    """Return ``scope`` if it is well formed and grants something real, else raise ScopeError."""
    parts = parse(scope)
    if not any(_overlaps(parts, parse(known)) for known in VOCABULARY):
        near = sorted(k for k in VOCABULARY if k.split(":")[0] == parts[0])
        raise ScopeError(f"{scope!r} grants nothing; scopes in {parts[0]!r}: {', '.join(near)}")
    return scope


def allows(granted: Iterable[str], required: str) -> bool:
    """Default deny: ``required`` is allowed only if some granted scope matches it."""
    need = parse(required)
    return any(segments_match(parse(g), need) for g in granted)


class Tier(StrEnum):
    """Presets of scopes, from the least to the most authority."""

    OBSERVE = "observe"
    JOURNAL = "journal"
    PROPOSE = "propose"
    REPAIR_NODE = "repair-node"
    REPAIR_CLUSTER = "repair-cluster"
    # Named so an operator who writes them gets a clear refusal: keys and
    # human-gated authority are never handed to a daemon.
    CUSTODY = "custody"
    HUMAN_GATED = "human-gated"


NEVER_GRANTED = frozenset({Tier.CUSTODY, Tier.HUMAN_GATED})

_OBSERVE = ("k8s:*:read", "host:*:read", "agent:peers:read")
_JOURNAL = (*_OBSERVE, "bus:report")
_PROPOSE = (*_JOURNAL, "bus:propose", "bus:vote", "bus:escalate")
_REPAIR_NODE = (*_PROPOSE, "host:units:start:*", "host:units:restart:*", "agent:peers:restart:*")
_REPAIR_CLUSTER = (
    *_REPAIR_NODE,
    "k8s:nodes:cordon", "k8s:nodes:uncordon", "k8s:nodes:drain", "k8s:pods:delete",
    *(f"k8s:{w}:restart" for w in RESTARTABLE_WORKLOADS),
)

TIER_SCOPES: dict[Tier, tuple[str, ...]] = {
    Tier.OBSERVE: _OBSERVE,
    Tier.JOURNAL: _JOURNAL,
    Tier.PROPOSE: _PROPOSE,
    Tier.REPAIR_NODE: _REPAIR_NODE,
    Tier.REPAIR_CLUSTER: _REPAIR_CLUSTER,
}


def effective_scopes(tier: Tier, extra: Iterable[str]) -> tuple[str, ...]:
    """The tier's preset plus the persona's own scopes, de-duplicated, in declaration order."""
    if tier in NEVER_GRANTED:
        raise ScopeError(f"tier {tier.value!r} is never granted to a daemon")
    return tuple(dict.fromkeys((*TIER_SCOPES[tier], *extra)))
