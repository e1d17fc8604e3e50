"""NATS permissions from the persona files: the bus itself refuses a message a persona may not send.

``zeta-agent render nats`` prints a complete nats-server configuration. Each persona
is an nkey user that may publish only under its own name (``zeta.agent.<p>.>``, its
own votes) and the repair subjects its scopes and duties call for; operators may
publish controls; watchers publish nothing on ``zeta.>``. A forged vote is then
dropped by the server before any agent sees it, on top of the signature check.

JetStream is driven by publishing to ``$JS.API.…`` subjects, so those are granted
one by one: exactly the requests nats-py makes for what each kind of user does
(found by tracing the client against a real server, see docs/operations.md), and
never the ones that destroy history (stream delete, purge, update, message delete).
Pure rendering: no I/O.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence

from bus import subjects
from bus.jetstream import AUDIT_STREAM, LEASES_BUCKET, LEASES_STREAM
from bus.messages import Target, TargetKind
from runtime.config.loading import ConfigSet
from runtime.model.catalog import CATALOG, Action, Params, UnitParams
from runtime.model.formats import Persona
from runtime.model.scopes import allows, parse

SUBSCRIBE_ALLOW: tuple[str, ...] = ("zeta.>", "_INBOX.>")
"""What operators and watchers may subscribe to (their tools use the shared inbox)."""


def subscribe_allow(persona: Persona) -> tuple[str, ...]:
    """A persona reads the bus and only its own replies (bus.subjects.inbox)."""
    return ("zeta.>", f"{subjects.inbox(persona.name)}.>")
"""Everyone may read the whole bus and receive replies (JetStream answers and
push-consumer deliveries both arrive on the client's inboxes)."""

_ANY_REPAIR = "*"


def _create(stream: str) -> tuple[str, ...]:
    """Create a stream if missing (``zeta-agent bus init``): operators only. Agents only
    look (STREAM.INFO, in ``_read``), so a stolen persona key cannot make the audit
    stream or the lease bucket again, weaker. The server refuses a create that would
    change an existing stream, so this changes nothing that exists."""
    return (f"$JS.API.STREAM.CREATE.{stream}",)


def _read(stream: str) -> tuple[str, ...]:
    """Read a stream: info, single messages, consumers (create, info, next, ack, flow control).

    Acks and flow-control answers are publishes to the reply subject of a delivered
    message (``$JS.ACK.<stream>.…``, ``$JS.FC.<stream>.…``). They are granted by
    subject rather than with ``allow_responses``: that would also let a persona answer
    requests it merely overheard on ``zeta.>``, such as another agent's publish
    awaiting JetStream's acknowledgement.
    """
    return (
        f"$JS.API.STREAM.INFO.{stream}",
        f"$JS.API.STREAM.MSG.GET.{stream}",
        f"$JS.API.CONSUMER.CREATE.{stream}",
        f"$JS.API.CONSUMER.CREATE.{stream}.>",
        f"$JS.API.CONSUMER.INFO.{stream}.*",
        f"$JS.API.CONSUMER.MSG.NEXT.{stream}.*",
        f"$JS.ACK.{stream}.>",
        f"$JS.FC.{stream}.>",
    )


def _unique(groups: Iterable[Iterable[str]]) -> list[str]:
    return list(dict.fromkeys(s for group in groups for s in group))


def _jetstream_common() -> list[str]:
    """What every agent and operator needs: both resources readable (and checked)."""
    return _unique([_read(AUDIT_STREAM), _read(LEASES_STREAM)])


def _probe_params(action: Action, granted: Sequence[str]) -> list[Params]:
    """Params to ask an action's scope function about: a unit action's scope names its
    unit, so every unit the persona's scopes name is tried; others take their defaults."""
    if action.params is not UnitParams:
        return [action.params()]
    units = {parse(s)[3] for s in granted if s.startswith("host:units:") and len(parse(s)) == 4}
    return [UnitParams(unit="probe.service" if u == "*" else u) for u in sorted(units)]


_HOLDS_NOTHING = frozenset({"bus.escalate"})
"""Telling people changes nothing a second executor could collide with: no lease."""


def lease_kinds(persona: Persona) -> list[TargetKind]:
    """The kinds of target whose leases ``persona`` may take: those of every catalog
    action its scopes allow on some target, if it executes at all."""
    spec = persona.spec
    if "execute" not in spec.duties:
        return []
    granted = spec.effective_scopes
    return list(dict.fromkeys(
        kind for action in CATALOG.values() if action.name not in _HOLDS_NOTHING
        for kind in action.targets
        if any(allows(granted, action.scope_for(Target(kind=kind, name="probe", host="probe"),
                                                params))
               for params in _probe_params(action, granted))))


def lease_subjects(persona: Persona) -> list[str]:
    """The lease keys ``persona`` may write (take, release), as bucket subjects.

    An executor may hold leases only on the kinds of target it may act on: one stolen
    executor key can then block the repairs of those kinds, not every repair.
    ``bus:leases:release`` clears the stale lease of anyone, so it writes every key
    (NATS cannot tell a put from a delete: both are publishes).
    """
    if allows(persona.spec.effective_scopes, "bus:leases:release"):
        return [f"$KV.{LEASES_BUCKET}.>"]
    return [f"$KV.{LEASES_BUCKET}.{kind}.>" for kind in lease_kinds(persona)]


def publish_allow(persona: Persona) -> list[str]:
    """Every subject ``persona`` may publish to, its own bus subjects first."""
    name, spec = persona.name, persona.spec
    bus: list[str] = [f"zeta.agent.{name}.>"]
    if allows(spec.effective_scopes, "bus:vote"):
        bus.append(subjects.vote(_ANY_REPAIR, name))
    if allows(spec.effective_scopes, "bus:propose"):
        bus += [subjects.proposed(_ANY_REPAIR), subjects.decided(_ANY_REPAIR)]
    if "execute" in spec.duties:
        bus += [subjects.started(_ANY_REPAIR), subjects.result(_ANY_REPAIR)]
    # Puts, creates and deletes of KV entries are plain publishes to the bucket's
    # subjects; reading goes through the JetStream API granted to everyone.
    return _unique([bus, lease_subjects(persona), _jetstream_common()])


def operator_publish_allow() -> list[str]:
    """Operators sign and publish controls (stored in the audit stream), may read it,
    and create the bus resources (``zeta-agent bus init``)."""
    return _unique([[subjects.control(">")], _create(AUDIT_STREAM), _create(LEASES_STREAM),
                    _jetstream_common()])


def watcher_publish_allow() -> list[str]:
    """Watchers only read: ``nats sub`` needs nothing; ``nats stream ls/info/view/get``,
    ``nats kv ls/history`` and ``zeta-agent audit`` need the read requests, and the CLI
    deletes the temporary consumer it read through (which destroys no message)."""
    return _unique([["$JS.API.INFO", "$JS.API.STREAM.NAMES", "$JS.API.STREAM.LIST"],
                    _read(AUDIT_STREAM), _read(LEASES_STREAM),
                    [f"$JS.API.CONSUMER.DELETE.{AUDIT_STREAM}.*",
                     f"$JS.API.CONSUMER.DELETE.{LEASES_STREAM}.*"]])


class UnsafeBusError(ValueError):
    """The rendered file would not do what it promises; nothing is rendered."""


class DuplicateKeyError(UnsafeBusError):
    """Two users share an nkey: the server could not tell them apart."""


def _check_unique_keys(users: Sequence[tuple[str, str]]) -> None:
    seen: dict[str, str] = {}
    for who, key in users:
        if key in seen:
            raise DuplicateKeyError(f"{who} has the same nkey as {seen[key]} ({key[:8]}…): "
                                    "every persona, operator and watcher needs its own key")
        seen[key] = who


def _user(comment: str, key: str, publish: Sequence[str],
          subscribe: Sequence[str] = SUBSCRIBE_ALLOW) -> list[str]:
    def array(values: Sequence[str], indent: str) -> list[str]:
        # JSON strings: a bare `$JS…` would be read as a config variable.
        return [f"{indent}{json.dumps(v)}{',' if i < len(values) - 1 else ''}"
                for i, v in enumerate(values)]

    return [
        f"    # {comment}",
        "    {",
        f"      nkey: {json.dumps(key)}",
        "      permissions: {",
        "        publish: { allow: [",
        *array(publish, " " * 10),
        "        ] }",
        "        subscribe: { allow: [",
        *array(subscribe, " " * 10),
        "        ] }",
        "      }",
        "    }",
    ]


def render_nats(config: ConfigSet, *, listen: str, store_dir: str | None,
                source: str = "") -> str:
    """A complete nats-server configuration: client port, JetStream, one user per identity.

    ``store_dir`` None leaves JetStream's store directory to the command line: the
    server refuses ``-sd`` together with a ``store_dir`` in its file. Raises
    DuplicateKeyError if two identities share an nkey, UnsafeBusError without a persona:
    nats-server reads an empty ``users`` list as no authorization at all, so anyone
    could connect and freeze the fleet.
    """
    personas = [config.personas[name].value for name in sorted(config.personas)]
    if not personas:
        raise UnsafeBusError("no persona to render a bus for: nats-server would read an empty "
                             "user list as no authorization and let anyone connect; add "
                             "personas/<name>.yaml first")
    fleet = config.fleet.spec
    _check_unique_keys([*((f"persona {p.name}", p.spec.identity.nkey) for p in personas),
                        *((f"operator {u.name}", u.nkey) for u in fleet.operators),
                        *((f"watcher {u.name}", u.nkey) for u in fleet.watchers)])
    users: list[str] = []
    for persona in personas:
        spec = persona.spec
        users += _user(f"persona {persona.name} ({spec.role}; duties: {', '.join(spec.duties)})",
                       spec.identity.nkey, publish_allow(persona), subscribe_allow(persona))
    for operator in fleet.operators:
        users += _user(f"operator {operator.name}", operator.nkey, operator_publish_allow())
    for watcher in fleet.watchers:
        users += _user(f"watcher {watcher.name} (read-only)", watcher.nkey,
                       watcher_publish_allow())
    origin = f" from {source}" if source else ""
    lines = [
        f"# Rendered by `zeta-agent render nats`{origin}; do not edit: re-render after",
        "# changing a persona, an operator or a watcher (docs/operations.md).",
        f"listen: {json.dumps(listen)}",
        "",
        *(["jetstream {", f"  store_dir: {json.dumps(store_dir)}", "}"] if store_dir is not None
          else ["# The store directory is given on the command line (nats-server -sd DIR).",
                "jetstream: enabled"]),
        "",
        "# Only the users below may connect; each may publish only what it is listed for.",
        "authorization {",
        "  users = [",
        *users,
        "  ]",
        "}",
    ]
    return "\n".join(lines) + "\n"
