"""System files rendered from the persona files: polkit rules and per-persona unit drop-ins.

``zeta-agent render polkit`` turns a persona's host scopes into a polkit rules file,
the third place a scope is enforced (after the runtime check in ``authorizing`` and in
the host actuators): a persona's user may start or restart exactly the units its
scopes name, restart peer agents only with an ``agent:peers:restart`` scope, and
reboot only with ``host:node:reboot``. Whether a scope grants a unit is decided by
``scopes.allows`` on the scope the catalog computes for that action, the same two
functions the runtime check uses, so the rules and the runtime cannot disagree about
a unit both know.

A wildcard unit (``host:units:restart:*``, which the ``repair-node`` tier grants) is
the one deliberate narrowing: polkit is given the units the persona's own policies
name, not "every unit". Every unit would include ``reboot.target``, ``poweroff.target``
and ``debug-shell.service`` (a root shell on tty9): ``start:*`` would be a reboot
without ``host:node:reboot`` and a way to root. The runtime only ever acts on units its
policies name anyway; anything else is refused by polkit and reported as a
scope/polkit mismatch. A wildcard peer (``agent:peers:restart:*``) has no such
problem: it becomes a pattern matching ``zeta-agent@<any persona name>.service`` and
nothing else, so a persona added later needs no re-render for its peers.

``zeta-agent render unit`` writes the drop-in for ``zeta-agent@<persona>.service``:
its description, every credential file the persona has, memory limits, and the runtime
directory its metrics socket needs, if it serves metrics on one.

Templates are Jinja2 files shipped in ``runtime/ops/render/templates`` with ``StrictUndefined``:
a value the template needs and the code forgot is an error, not an empty string.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import jinja2

from bus.messages import Target
from bus.subjects import PERSONA_NAME
from runtime.config.credentials import KUBECONFIG_FILE, OPTIONAL_FILES, SEED_FILE
from runtime.host.acting import (
    AGENT_UNIT,
    PEER_VERB,
    UNIT_VERBS,
    PeerRestart,
    Reboot,
    unit_name_error,
)
from runtime.host.observing import watched_units
from runtime.model.catalog import CATALOG, NoParams, UnitParams
from runtime.model.formats import Persona, RepairPolicy, UnixListen, parse_listen
from runtime.model.scopes import allows, parse

DEFAULT_CREDENTIALS_DIR = Path("/etc/zeta/credentials")
"""The directory systemd/zeta-agent@.service loads the seed from and hides from the agent."""
RUNTIME_DIRECTORY = PurePosixPath("/run/zeta-agent")
"""Where a persona's metrics socket may live: ``/run/zeta-agent/<persona>/``."""

_ENVIRONMENT = jinja2.Environment(
    loader=jinja2.PackageLoader("runtime.ops.render", "templates"),
    undefined=jinja2.StrictUndefined,
    # Neither file is HTML; values that land in JavaScript go through the `js` filter.
    autoescape=False,  # noqa: S701
    trim_blocks=True,
    lstrip_blocks=True,
    keep_trailing_newline=True,
)
_ENVIRONMENT.filters["js"] = json.dumps


def _agent_unit_pattern() -> str:
    """A JavaScript regex body for ``zeta-agent@<persona name>.service``."""
    before, after = AGENT_UNIT.split("{persona}")
    return before + PERSONA_NAME.pattern.strip("^$") + after.replace(".", "\\.")


# ---------------------------------------------------------------- polkit


@dataclass(frozen=True)
class UnitGrant:
    """polkit lets the persona's user run ``systemctl VERB UNIT``, because of ``scope``."""

    verb: str
    unit: str
    scope: str


@dataclass(frozen=True)
class HostGrants:
    """What a persona may do to this host through systemd and logind."""

    name: str
    role: str
    tier: str
    user: str
    units: tuple[UnitGrant, ...]
    any_peer: str | None  # the wildcard peer scope, when granted
    reboot: bool
    notes: tuple[str, ...]

    @property
    def grants_nothing(self) -> bool:
        return not (self.units or self.any_peer or self.reboot)


def _selectors(scopes: Iterable[str], domain: str) -> list[str]:
    """The last segment of every four-segment scope of ``domain``, in order."""
    return [parts[3] for parts in map(parse, scopes) if parts[0] == domain and len(parts) == 4]


def host_grants(persona: Persona, policies: Sequence[RepairPolicy]) -> HostGrants:
    """The units, verbs, peers and reboot ``persona``'s effective scopes grant on a host."""
    scopes = persona.spec.effective_scopes
    notes: list[str] = []
    units = [s for s in _selectors(scopes, "host") if s != "*"]
    if "*" in _selectors(scopes, "host"):
        named = watched_units(policies)
        notes.append(
            "A wildcard unit scope is narrowed to the units this persona's policies name ("
            + (", ".join(named) or "none") + "): every unit would include reboot.target and "
            "debug-shell.service.")
        units += named
    grants: list[UnitGrant] = []
    for unit in dict.fromkeys(units):
        if problem := unit_name_error(unit):
            notes.append(f"Grants nothing: {problem}.")
            continue
        for action, verb in UNIT_VERBS.items():
            scope = CATALOG[action].scope_for(Target(kind="unit", name=unit),
                                              UnitParams(unit=unit))
            if allows(scopes, scope):
                grants.append(UnitGrant(verb, unit, scope))
    peer = CATALOG[PeerRestart.action]
    wildcard = peer.scope_for(Target(kind="persona", name="*"), NoParams())
    any_peer = wildcard if allows(scopes, wildcard) else None
    if any_peer is None:
        for name in dict.fromkeys(_selectors(scopes, "agent")):
            scope = peer.scope_for(Target(kind="persona", name=name), NoParams())
            if allows(scopes, scope) and PERSONA_NAME.match(name):
                grants.append(UnitGrant(PEER_VERB, AGENT_UNIT.format(persona=name), scope))
    reboot = allows(scopes, CATALOG[Reboot.action].scope_for(
        Target(kind="host", name="*"), NoParams()))
    spec = persona.spec
    return HostGrants(name=persona.name, role=spec.role, tier=spec.tier.value,
                      user=f"zeta-{persona.name}", units=tuple(grants), any_peer=any_peer,
                      reboot=reboot, notes=tuple(notes))


def polkit_file(persona: str | None) -> str:
    """The rules.d file name for one persona's rules, or for every persona's (None)."""
    return f"60-zeta-{persona}.rules" if persona else "60-zeta-agents.rules"


def render_polkit(personas: Iterable[tuple[Persona, Sequence[RepairPolicy]]], *,
                  source: str, filename: str) -> str:
    """A polkit rules file with one rule per persona (by name), each with its policies."""
    grants = sorted((host_grants(p, policies) for p, policies in personas),
                    key=lambda g: g.name)
    return _ENVIRONMENT.get_template("polkit.rules.j2").render(
        personas=grants, source=source, filename=filename, peer_verb=PEER_VERB,
        peer_unit=_agent_unit_pattern())


# ---------------------------------------------------------------- unit drop-in


@dataclass(frozen=True)
class Credential:
    name: str
    path: Path


@dataclass(frozen=True)
class Limits:
    memory_high: str
    memory_max: str
    why: str


# Measured (docs/benchmarks.md): an agent idles at 65-120 MiB; the Kubernetes watches of
# a 1,000-node cluster add about 57 MiB.
WATCHING_LIMITS = Limits("384M", "512M", "Memory: this persona watches Kubernetes (it has a "
                                         "kubeconfig), whose objects it keeps in memory.")
HOST_ONLY_LIMITS = Limits("192M", "256M", "Memory: no kubeconfig, so no Kubernetes watches; "
                                          "an agent without them stays near 120 MiB.")


def render_unit(persona: Persona, *, credentials_dir: Path, source: str) -> str:
    """The drop-in for ``zeta-agent@<persona>.service``: credentials that exist, limits.

    The seed is always listed (an agent without it cannot vote, so its start should
    fail loudly); the optional credentials only when their files exist now.
    """
    directory = credentials_dir / persona.name
    present = [Credential(SEED_FILE, directory / SEED_FILE)]
    absent: list[Credential] = []
    for name in OPTIONAL_FILES:
        credential = Credential(name, directory / name)
        (present if credential.path.is_file() else absent).append(credential)
    watching = any(c.name == KUBECONFIG_FILE for c in present)
    metrics = persona.spec.metrics
    listen = parse_listen(metrics.listen) if metrics is not None else None
    return _ENVIRONMENT.get_template("unit.conf.j2").render(
        name=persona.name, display_name=persona.spec.displayName, role=persona.spec.role,
        source=source, credentials_dir=credentials_dir,
        default_credentials_dir=DEFAULT_CREDENTIALS_DIR, present=present, absent=absent,
        seed_present=present[0].path.is_file(),
        limits=WATCHING_LIMITS if watching else HOST_ONLY_LIMITS,
        metrics_socket=listen if isinstance(listen, UnixListen) else None,
        runtime_directory=RUNTIME_DIRECTORY / persona.name)
