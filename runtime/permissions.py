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
from bus.jetstream import AUDIT_STREAM, LEASES_BUCKET
from runtime.config import Persona
from runtime.loading import ConfigSet
from runtime.scopes import allows

LEASES_STREAM = f"KV_{LEASES_BUCKET}"
"""The stream a KV bucket is stored in; its JetStream API requests name this."""

SUBSCRIBE_ALLOW: tuple[str, ...] = ("zeta.>", "_INBOX.>")
"""What operators and watchers may subscribe to (their tools use the shared inbox)."""


def subscribe_allow(persona: Persona) -> tuple[str, ...]:
    """A persona reads the bus and only its own replies (bus.subjects.inbox)."""
    return ("zeta.>", f"{subjects.inbox(persona.name)}.>")
"""Everyone may read the whole bus and receive replies (JetStream answers and
push-consumer deliveries both arrive on the client's inboxes)."""

_ANY_REPAIR = "*"


def _ensure(stream: str) -> tuple[str, ...]:
    """Look a stream up and create it if missing (``bus.jetstream.ensure``).

    Creating an existing stream with another configuration is refused by the
    server, so CREATE cannot be used to change the audit stream's settings.
    """
    return (f"$JS.API.STREAM.INFO.{stream}", f"$JS.API.STREAM.CREATE.{stream}")


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
    """What every agent and operator needs: both resources ensured, both readable."""
    return _unique([_ensure(AUDIT_STREAM), _read(AUDIT_STREAM),
                    _ensure(LEASES_STREAM), _read(LEASES_STREAM)])


def writes_leases(persona: Persona) -> bool:
    """Executors take and release leases; ``bus:leases:release`` clears stale ones."""
    spec = persona.spec
    return "execute" in spec.duties or allows(spec.effective_scopes, "bus:leases:release")


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
    leases = [f"$KV.{LEASES_BUCKET}.>"] if writes_leases(persona) else []
    return _unique([bus, leases, _jetstream_common()])


def operator_publish_allow() -> list[str]:
    """Operators sign and publish controls (stored in the audit stream) and may read it."""
    return _unique([[subjects.control(">")], _jetstream_common()])


def watcher_publish_allow() -> list[str]:
    """Watchers only read: ``nats sub`` needs nothing; ``nats stream ls/info/view/get``,
    ``nats kv ls/history`` and ``zeta-agent audit`` need the read requests, and the CLI
    deletes the temporary consumer it read through (which destroys no message)."""
    return _unique([["$JS.API.INFO", "$JS.API.STREAM.NAMES", "$JS.API.STREAM.LIST"],
                    _read(AUDIT_STREAM), _read(LEASES_STREAM),
                    [f"$JS.API.CONSUMER.DELETE.{AUDIT_STREAM}.*",
                     f"$JS.API.CONSUMER.DELETE.{LEASES_STREAM}.*"]])


class DuplicateKeyError(ValueError):
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
    DuplicateKeyError if two identities share an nkey.
    """
    personas = [config.personas[name].value for name in sorted(config.personas)]
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
