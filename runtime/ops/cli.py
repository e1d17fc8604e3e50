"""``zeta-agent``: run a persona, check configuration, list personas, render system files,
watch the bus and audit its history, make keys, freeze or thaw the fleet, and ask a
persona's model brain about a recorded incident (``think``).

User mistakes (a missing directory, a bad file, an unknown persona) end with a clear
message on stderr and a non-zero exit, never a traceback. Exit codes: 0 success;
1 ``validate`` found errors, ``audit verify`` found violations or a control could not
be sent; 2 the command could not start (bad usage or configuration), so a systemd unit
can stop restarting on it with ``RestartPreventExitStatus=2``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TypeAlias, cast

from pydantic import ValidationError

from bus import ids
from bus.connection import Connection, subject_for
from bus.envelope import format_time
from bus.jetstream import AUDIT_STREAM
from bus.reading import Stored
from bus.subjects import PERSONA_NAME
from runtime import __version__
from runtime.agent import deliberating, logs, wiring
from runtime.agent import loop as agent
from runtime.agent.coordinating import Roster, jetstream_settings
from runtime.brain import choosing
from runtime.brain.asking import BrainUnavailableError
from runtime.config.credentials import seed_file
from runtime.config.loading import ConfigError, ConfigInvalidError, ConfigSet, config_paths, load
from runtime.model.formats import DEFAULT_FLEET, AnthropicBrain, Fleet, Persona
from runtime.model.snapshot import Snapshot
from runtime.ops import audit as auditing
from runtime.ops import controls as operating
from runtime.ops import watch as watching
from runtime.ops.render import nats as permissions
from runtime.ops.render import rbac
from runtime.ops.render import units as rendering

CONFIG_ENV = "ZETA_CONFIG_DIR"
DEFAULT_CONFIG_DIR = Path("/etc/zeta")
SYSUSERS_GROUP = "zeta"
DEFAULT_NATS_LISTEN = "127.0.0.1:4222"
DEFAULT_NATS_STORE = Path("/var/lib/zeta-bus")


class UserError(Exception):
    """A mistake the user can fix; ``lines`` (if any) are printed before the message."""

    def __init__(self, message: str, *, lines: Sequence[str] = (), code: int = 2) -> None:
        super().__init__(message)
        self.lines = tuple(lines)
        self.code = code


# ---------------------------------------------------------------- configuration


def config_dir(flag: Path | None, environ: Mapping[str, str] = os.environ) -> Path:
    """``--config-dir``, else ``$ZETA_CONFIG_DIR``, else /etc/zeta."""
    if flag is not None:
        return flag
    return Path(environ[CONFIG_ENV]) if environ.get(CONFIG_ENV) else DEFAULT_CONFIG_DIR


def _is_config_dir(path: Path) -> bool:
    return (path / "personas").is_dir() or (path / "policies").is_dir()


def _errors(errors: Sequence[ConfigError], where: str, *, code: int) -> UserError:
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
        raise _errors(exc.errors, str(directory), code=2) from None


def _persona(config: ConfigSet, name: str, directory: Path) -> Persona:
    if name not in config.personas:
        known = ", ".join(sorted(config.personas)) or "none"
        raise UserError(f"no persona {name!r} in {directory / 'personas'}; known: {known}")
    return config.persona(name)


# ---------------------------------------------------------------- commands


def _run(args: argparse.Namespace) -> int:
    directory = config_dir(args.config_dir)
    config = load_config_dir(directory)
    persona = _persona(config, args.persona, directory)
    try:
        state_dir = agent.state_directory(persona.name)
    except OSError as exc:
        raise UserError(f"cannot create the state directory: {exc}") from None
    logs.configure(args.log_format, level=args.log_level)
    return wiring.serve(config, persona.name, state_dir=state_dir, once=args.once)


def _validate(args: argparse.Namespace) -> int:
    given: list[Path] = args.paths or [config_dir(args.config_dir)]
    paths = [p for path in given
             for p in (config_paths(path) if _is_config_dir(path) else [path])]
    config = load(paths, strict=False)
    where = " ".join(map(str, given))
    if config.errors:
        raise _errors(sorted(config.errors), where, code=1)
    if not config.personas and not config.policies and config.fleet_file is None:
        raise UserError(f"no persona, policy or fleet files under {where}", code=1)
    fleet = config.fleet_file or "built-in defaults"
    print(f"ok: {len(config.personas)} personas, {len(config.policies)} policies, "
          f"fleet: {fleet}")
    return 0


def _personas(args: argparse.Namespace) -> int:
    directory = config_dir(args.config_dir)
    personas = [located.value for _, located in
                sorted(load_config_dir(directory).personas.items())]
    if args.json:
        print(json.dumps([_persona_json(p) for p in personas], indent=2))
    else:
        print(personas_table(personas), end="")
    return 0


def _persona_json(persona: Persona) -> dict[str, object]:
    spec = persona.spec
    return {"name": persona.name, "displayName": spec.displayName, "role": spec.role,
            "tier": spec.tier.value, "duties": list(spec.duties), "scopes": list(spec.scopes),
            "effectiveScopes": list(spec.effective_scopes), "policies": list(spec.policies),
            "tick": spec.tick.total_seconds()}


def personas_table(personas: Sequence[Persona]) -> str:
    """Name, role, tier, duties and the persona's own scopes (one per line) on top of its tier."""
    header = ["NAME", "ROLE", "TIER", "DUTIES", "SCOPES (beyond the tier)"]
    rows: list[list[str]] = []
    for persona in personas:
        spec = persona.spec
        scopes = list(spec.scopes) or ["-"]
        rows.append([persona.name, spec.role, spec.tier.value, ",".join(spec.duties), scopes[0]])
        rows.extend(["", "", "", "", scope] for scope in scopes[1:])
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(4)]
    return "".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row[:4], widths, strict=True))
        + "  " + row[4] + "\n"
        for row in [header, *rows])


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


def _render_sysusers(args: argparse.Namespace) -> int:
    directory = config_dir(args.config_dir)
    config = load_config_dir(directory)
    print(render_sysusers([p.value for p in config.personas.values()], str(directory)), end="")
    return 0


def _version(_args: argparse.Namespace) -> int:
    print(f"zeta-agent {__version__}")
    return 0


# ---------------------------------------------------------------- watching the bus


def _bus_urls(args: argparse.Namespace, config: ConfigSet) -> list[str]:
    """--bus, else $ZETA_NATS_URL, else fleet.yaml: the same order as the agents use."""
    return list(args.bus or wiring.bus_urls(config))


def _seed(path: Path | None) -> bytes | None:
    if path is None:
        return None
    try:
        return path.read_bytes()
    except OSError as exc:
        raise UserError(f"cannot read the seed {path}: {exc.strerror or exc}") from None


def _watch(args: argparse.Namespace) -> int:
    config = load_config_dir(config_dir(args.config_dir))
    # Logs (bus reconnects) go to stderr: stdout is the view, or JSON lines for scripts.
    logs.configure(level="warning", stream=sys.stderr)
    connection = Connection(_bus_urls(args, config), name="zeta-agent watch",
                            seed=_seed(args.seed))
    view = watching.View(Roster.of(config))
    asyncio.run(watching.watch(connection, view, sys.stdout, as_json=args.json,
                               summary_every=args.summary_every or None, ready=sys.stderr))
    return 0


async def _read_audit(urls: Sequence[str], seed: bytes | None, repair: str | None,
                      connect_within: float) -> list[Stored]:
    connection = Connection(urls, name="zeta-agent audit", seed=seed)
    try:
        # Connection retries forever (right for an agent); a one-shot command gives up.
        async with asyncio.timeout(connect_within):
            await connection.connect()
    except TimeoutError:
        raise UserError(f"cannot reach the bus at {', '.join(urls)} "
                        f"within {connect_within:g}s") from None
    try:
        return await auditing.read(connection.js, repair)
    except auditing.StreamMissingError:
        raise UserError(f"the bus at {', '.join(urls)} has no {AUDIT_STREAM} stream: "
                        "no agent has started there yet") from None
    finally:
        await connection.close()


def _audit(args: argparse.Namespace) -> int:
    if args.repair is not None and not ids.is_id(args.repair):
        raise UserError(f"{args.repair!r} is not a repair id (26 characters, like "
                        f"{ids.new_id()})")
    config = load_config_dir(config_dir(args.config_dir))
    # A one-shot read: connection warnings (the disconnect at exit) would only be noise.
    logs.configure(level="error", stream=sys.stderr)
    urls = _bus_urls(args, config)
    stored = asyncio.run(_read_audit(urls, _seed(args.seed), args.repair, args.timeout))
    roster = Roster.of(config)
    if args.repair and not stored:
        raise UserError(f"no messages of repair {args.repair} in {AUDIT_STREAM}", code=1)
    if args.check == "verify":
        violations = auditing.verify(
            stored, roster.keys, roster.operators, roster.voters,
            policies={name: p.value for name, p in config.policies.items()},
            default_quorum=config.fleet.spec.quorum)
        for violation in violations:
            print(json.dumps(asdict(violation)) if args.json else violation)
        verdict = f"{len(violations)} violation(s)" if violations else "ok"
        print(f"{verdict}: {len(stored)} messages checked", file=sys.stderr)
        return 1 if violations else 0
    verifier = roster.verifier()
    if args.repair:
        for line in auditing.listing(stored, verifier, as_json=args.json):
            print(line)
        return 0
    summaries, controls = auditing.summarize(stored, verifier)
    if args.json:
        for summary in summaries:
            print(json.dumps(summary.as_json()))
        for control in controls:
            print(json.dumps({"control": control.envelope.model_dump(mode="json",
                                                                     by_alias=True)}))
        return 0
    for line in auditing.table(summaries):
        print(line)
    for control in controls:
        print(f"{format_time(control.envelope.at)} "
              f"{watching.describe(control.envelope, control.body)}")
    return 0


# ---------------------------------------------------------------- keys, bus permissions, controls


def _fleet_of(directory: Path) -> Fleet:
    """fleet.yaml alone (defaults without one): a broken persona file must not stop keygen."""
    fleet_file = directory / "fleet.yaml"
    if not fleet_file.exists():
        return DEFAULT_FLEET
    try:
        return load([fleet_file]).fleet
    except ConfigInvalidError as exc:
        raise _errors(exc.errors, str(fleet_file), code=2) from None


def _keygen(args: argparse.Namespace) -> int:
    name: str = args.name
    if not PERSONA_NAME.match(name):
        raise UserError(f"{name!r} is not a valid name: lowercase letters, digits and '-', "
                        "starting with a letter, at most 26 characters")
    directory = config_dir(args.config_dir)
    persona = operating.persona_file(directory, name) if args.write else None
    if persona is not None and not persona.is_file():
        raise UserError(f"--write needs the persona file {persona}, which does not exist "
                        "(without --write, keygen makes a key for any name, e.g. an operator)")
    credentials = args.credentials_dir or Path(_fleet_of(directory).spec.credentialsDir)
    try:
        key = operating.keygen(name, credentials_dir=credentials, persona=persona,
                               force=args.force)
    except operating.OperatingError as exc:
        raise UserError(str(exc)) from None
    # The key alone on stdout, so `KEY=$(zeta-agent keygen …)` works; the rest is for people.
    print(f"wrote {seed_file(credentials, name)} (mode 0600)", file=sys.stderr)
    if persona is not None:
        print(f"set spec.identity.nkey in {persona}", file=sys.stderr)
    print(key)
    return 0


def _listen(value: str) -> str:
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}")
    return value


def _text(value: str) -> str:
    if not value.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return value


def _render_nats(args: argparse.Namespace) -> int:
    directory = config_dir(args.config_dir)
    config = load_config_dir(directory)
    try:
        text = permissions.render_nats(config, listen=args.listen,
                                       store_dir=str(args.store_dir), source=str(directory))
    except permissions.DuplicateKeyError as exc:
        raise UserError(str(exc)) from None
    print(text, end="")
    return 0


def _render_rbac(args: argparse.Namespace) -> int:
    directory = config_dir(args.config_dir)
    config = load_config_dir(directory)
    if args.all:
        print(rbac.render_all(p.value for p in config.personas.values()), end="")
    else:
        print(rbac.render_rbac(_persona(config, args.persona, directory)), end="")
    return 0


def _render_polkit(args: argparse.Namespace) -> int:
    directory = config_dir(args.config_dir)
    config = load_config_dir(directory)
    personas = ([p.value for _, p in sorted(config.personas.items())] if args.all
                else [_persona(config, args.persona, directory)])
    print(rendering.render_polkit(((p, config.policies_of(p)) for p in personas),
                                  source=str(directory),
                                  filename=rendering.polkit_file(args.persona)), end="")
    return 0


def _render_unit(args: argparse.Namespace) -> int:
    directory = config_dir(args.config_dir)
    config = load_config_dir(directory)
    persona = _persona(config, args.persona, directory)
    credentials = args.credentials_dir or Path(config.fleet.spec.credentialsDir)
    print(rendering.render_unit(persona, credentials_dir=credentials, source=str(directory)),
          end="")
    return 0


def _control(args: argparse.Namespace) -> int:
    directory = config_dir(args.config_dir)
    config = load_config_dir(directory)
    policy: str | None = getattr(args, "policy", None)
    if policy is not None and policy not in config.policies:
        known = ", ".join(sorted(config.policies)) or "none"
        raise UserError(f"no policy {policy!r} in {directory / 'policies'}; known: {known}")
    fleet = config.fleet.spec
    seed_path = args.seed or seed_file(Path(fleet.credentialsDir), args.operator)
    seed = _seed(seed_path) or b""
    urls = _bus_urls(args, config)
    # Bus reconnect warnings go to stderr: stdout says what was sent.
    logs.configure(level="warning", stream=sys.stderr)
    try:
        signer = operating.operator_signer(config.fleet, args.operator, seed, seed_path)
        envelope = operating.control(args.verb, operator=args.operator, signer=signer,
                                     reason=args.reason, policy=policy,
                                     host=socket.gethostname())
        problems = asyncio.run(operating.send(
            envelope, urls=urls, seed=seed, within=args.timeout,
            settings=jetstream_settings(config)))
    except operating.NotSentError as exc:
        raise UserError(str(exc), code=1) from None
    except operating.OperatingError as exc:
        raise UserError(str(exc)) from None
    for problem in problems:
        print(f"warning: {problem}", file=sys.stderr)
    print(f"sent {args.verb} as operator {args.operator} on {subject_for(envelope)} "
          f"to {', '.join(urls)}")
    print(envelope.to_bytes().decode("utf-8"))
    return 0


# ---------------------------------------------------------------- thinking


def _think(args: argparse.Namespace) -> int:
    directory = config_dir(args.config_dir)
    config = load_config_dir(directory)
    persona = _persona(config, args.persona, directory)
    try:
        snapshot = Snapshot.model_validate_json(args.incident.read_bytes())
    except (OSError, ValidationError) as exc:
        raise UserError(f"{args.incident}: not an incident (an observation Snapshot as "
                        f"JSON, see docs/examples/): {exc}") from None
    brain = persona.spec.brain
    settings = brain if isinstance(brain, AnthropicBrain) else AnthropicBrain(kind="anthropic")
    if args.model:
        settings = settings.model_copy(update={"model": args.model})
    # Log lines (discards, retries) go to stderr: stdout is the answer, maybe JSON.
    logs.configure("console", level="warning", stream=sys.stderr)
    thinker = deliberating.thinker_for(config, persona.name, os.environ, settings=settings)
    assert thinker is not None  # settings is an AnthropicBrain
    evaluation = deliberating.replay(snapshot, config.policies_of(persona),
                                     default_quorum=config.fleet.spec.quorum)
    pending = choosing.cases(evaluation.intents, thinker.policies, snapshot.host or None)
    if not pending:
        print(json.dumps({"candidates": [], "discarded": []}) if args.json else
              f"no finding awaits a decision in {args.incident} under {persona.name}'s policies")
        return 0
    if args.show_prompt:
        print(thinker.prompt(pending, evaluation.findings, snapshot), file=sys.stderr
              if args.json else sys.stdout)
    try:
        result = asyncio.run(thinker.think(pending, evaluation.findings, snapshot))
    except BrainUnavailableError as exc:
        raise UserError(f"the model is unavailable ({exc}); the rules brain would decide",
                        code=1) from None
    answer = deliberating.summary(result, pending)
    if args.json:
        print(json.dumps(answer, indent=2, default=str))
        return 0
    for item in answer["candidates"]:
        print(f"candidate {item['finding']}: {item['action']} on {item['target']} "
              f"(step {item['step']} of {item['policy']}): {item['rationale']}")
    for item in answer["discarded"]:
        print(f"discarded {item['tool']} ({item['kind']}): {item['reason']}")
    for item in answer["rules_step_stands"]:
        print(f"no candidate for {item['finding']}: the rules step stands, {item['action']} on "
              f"{item['target']} (step {item['step']} of {item['policy']})")
    return 0


def _think_parser(commands: Commands) -> None:
    think = commands.add_parser(
        "think", help="ask a persona's model brain about a recorded incident; acts on nothing",
        description="Render PERSONA's prompt for a recorded observation snapshot, ask the "
                    "model, and print the validated candidate actions and every discarded "
                    "tool call with its reason. Nothing is proposed or executed. The key comes "
                    "from $CREDENTIALS_DIRECTORY/anthropic-api-key or $ANTHROPIC_API_KEY.")
    think.add_argument("persona", help="the persona's name, e.g. otto")
    think.add_argument("--incident", type=Path, required=True, metavar="FILE.json",
                       help="an observation Snapshot as JSON "
                            "(docs/examples/incident-node-not-ready.json)")
    think.add_argument("--show-prompt", action="store_true",
                       help="print the rendered prompt first (to stderr with --json)")
    think.add_argument("--json", action="store_true", help="machine-readable output")
    think.add_argument("--model", help="the model, when the persona's brain does not name one")
    _config_dir_option(think)
    think.set_defaults(handler=_think)


# ---------------------------------------------------------------- parser


Handler = Callable[[argparse.Namespace], int]


def _bus_url_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bus", action="append", metavar="URL",
                        help="NATS URL, repeatable (default: $ZETA_NATS_URL, else the "
                             "fleet's bus.urls)")


def _bus_options(parser: argparse.ArgumentParser) -> None:
    _bus_url_option(parser)
    parser.add_argument("--seed", type=Path, metavar="FILE",
                        help="an nkey seed to connect with, e.g. a watcher's (default: none)")
    parser.add_argument("--json", action="store_true", help="one JSON object per line")


def _config_dir_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config-dir", type=Path, metavar="DIR",
                        help=f"holds personas/, policies/ and an optional fleet.yaml "
                             f"(default: ${CONFIG_ENV}, else {DEFAULT_CONFIG_DIR})")


# What add_subparsers returns; argparse has no public name for it.
Commands: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


def _render_nats_parser(targets: Commands) -> None:
    nats = targets.add_parser(
        "nats", help="a nats-server config: JetStream and one nkey user per persona, "
                     "operator and watcher, each allowed to publish only its own subjects")
    _config_dir_option(nats)
    nats.add_argument("--listen", type=_listen, default=DEFAULT_NATS_LISTEN,
                      metavar="HOST:PORT",
                      help=f"client address (default: {DEFAULT_NATS_LISTEN})")
    nats.add_argument("--store-dir", type=Path, default=DEFAULT_NATS_STORE, metavar="DIR",
                      help=f"JetStream's store (default: {DEFAULT_NATS_STORE})")
    nats.set_defaults(handler=_render_nats)


def _persona_or_all(command: argparse.ArgumentParser, *, every: str) -> None:
    which = command.add_mutually_exclusive_group(required=True)
    which.add_argument("persona", nargs="?", help="the persona's name, e.g. otto")
    which.add_argument("--all", action="store_true", help=every)
    _config_dir_option(command)


def _render_rbac_parser(targets: Commands) -> None:
    command = targets.add_parser(
        "rbac", help="Kubernetes ClusterRole and ClusterRoleBinding for a persona's user, "
                     "with exactly the verbs its scopes need")
    _persona_or_all(command, every="every persona, one after another")
    command.set_defaults(handler=_render_rbac)


def _render_host_parsers(targets: Commands) -> None:
    polkit = targets.add_parser(
        "polkit", help="polkit rules letting a persona's user start or restart exactly the "
                       "units its scopes name (and reboot only with host:node:reboot)")
    _persona_or_all(polkit, every="every persona, in one file")
    polkit.set_defaults(handler=_render_polkit)
    unit = targets.add_parser(
        "unit", help="the drop-in for zeta-agent@PERSONA.service: credentials and limits")
    unit.add_argument("persona", help="the persona's name, e.g. otto")
    _config_dir_option(unit)
    unit.add_argument("--credentials-dir", type=Path, metavar="DIR",
                      help="where the persona's credentials are, in PERSONA/ "
                           "(default: the fleet's credentialsDir)")
    unit.set_defaults(handler=_render_unit)


def _keygen_parser(commands: Commands) -> None:
    keygen = commands.add_parser(
        "keygen", help="write a new nkey seed for a persona, operator or watcher",
        description="Write a new nkey seed to <credentials-dir>/NAME/nkey.seed (mode 0600, "
                    "never printed) and print its public key on stdout. With --write, also "
                    "set spec.identity.nkey in the persona file, changing nothing else.")
    keygen.add_argument("name", metavar="NAME",
                        help="a persona, or an operator or watcher to list in fleet.yaml")
    keygen.add_argument("--credentials-dir", type=Path, metavar="DIR",
                        help="default: the fleet's credentialsDir")
    _config_dir_option(keygen)
    keygen.add_argument("--write", action="store_true",
                        help="put the public key in <config-dir>/personas/NAME.yaml")
    keygen.add_argument("--force", action="store_true",
                        help="replace an existing seed (its old key stops working)")
    keygen.set_defaults(handler=_keygen)


def _bus_resources(args: argparse.Namespace) -> int:
    config = load_config_dir(config_dir(args.config_dir))
    seed: bytes | None = None
    if args.seed is not None or args.operator is not None:
        seed_path = args.seed or seed_file(Path(config.fleet.spec.credentialsDir), args.operator)
        seed = _seed(seed_path)
    urls = _bus_urls(args, config)
    logs.configure(level="warning", stream=sys.stderr)
    try:
        problems = asyncio.run(operating.bus_resources(
            args.action, urls=urls, seed=seed, settings=jetstream_settings(config),
            within=args.timeout))
    except operating.NotSentError as exc:
        raise UserError(str(exc), code=2) from None
    for problem in problems:
        print(problem)
    if problems:
        print(f"{len(problems)} difference(s): agents refuse destructive work until the "
              "bus's administrator fixes them (docs/operations.md)", file=sys.stderr)
        return 1
    print(f"{AUDIT_STREAM} and the lease bucket are as fleet.yaml says", file=sys.stderr)
    return 0


def _bus_parsers(commands: Commands) -> None:
    bus = commands.add_parser(
        "bus", help="create or check the audit stream and lease bucket (operators)",
        description="Agents only check the bus resources and refuse destructive work while "
                    "they differ from fleet.yaml; an operator creates and changes them.")
    actions = bus.add_subparsers(dest="action", required=True, metavar="ACTION")
    for action, summary in (
            ("init", "create the audit stream and lease bucket if missing, then check them"),
            ("check", "say how they differ from fleet.yaml (changes nothing; exit 1 if any)")):
        command = actions.add_parser(action, help=summary, description=summary[0].upper()
                                     + summary[1:] + ". Exit 0: as configured; 1: differences "
                                     "remain; 2: the bus could not be reached.")
        command.add_argument("--operator", metavar="NAME",
                             help="authenticate as this operator (its seed from "
                                  "<credentialsDir>/NAME/nkey.seed)")
        command.add_argument("--seed", type=Path, metavar="FILE",
                             help="authenticate with this nkey seed")
        _config_dir_option(command)
        _bus_url_option(command)
        command.add_argument("--timeout", type=float, default=10.0, metavar="SECONDS",
                             help="give up after this long (default: 10)")
        command.set_defaults(handler=_bus_resources)


def _control_parsers(commands: Commands) -> None:
    for verb, summary in (("freeze", "stop all destructive work fleet-wide"),
                          ("thaw", "resume destructive work after a freeze"),
                          ("breaker-reset", "close a policy's tripped circuit breaker")):
        command = commands.add_parser(
            verb, help=f"{summary} (signed with an operator key)",
            description=f"{summary[0].upper()}{summary[1:]}: publish a control signed with "
                        f"the operator's key on zeta.control.{verb}, stored in "
                        f"{AUDIT_STREAM}.")
        command.add_argument("--operator", required=True, metavar="NAME",
                             help="an operator listed in fleet.yaml")
        command.add_argument("--reason", required=True, type=_text, metavar="TEXT",
                             help="why; every agent logs it and the audit keeps it")
        if verb == "breaker-reset":
            command.add_argument("--policy", required=True, metavar="P",
                                 help="the policy whose breaker to reset")
        command.add_argument("--seed", type=Path, metavar="FILE",
                             help="the operator's nkey seed "
                                  "(default: <credentialsDir>/NAME/nkey.seed)")
        _config_dir_option(command)
        _bus_url_option(command)
        command.add_argument("--timeout", type=float, default=5.0, metavar="SECONDS",
                             help="give up reaching the bus after this long (default: 5)")
        command.set_defaults(handler=_control, verb=verb)


def build_parser() -> argparse.ArgumentParser:
    """The ``zeta-agent`` argument parser, every subcommand included."""
    parser = argparse.ArgumentParser(prog="zeta-agent", description=(
        "Out-of-band repair agents for Kubernetes: named personas under systemd that "
        "act only within their scopes, and destructive actions only with a quorum."))
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    run = commands.add_parser("run", help="run one persona's agent (what systemd starts)",
                              description="Run the agent of PERSONA until SIGTERM.")
    run.add_argument("persona", help="the persona's name, e.g. otto")
    _config_dir_option(run)
    run.add_argument("--once", action="store_true",
                     help="run one tick and exit: 0 if it completed, 1 if it raised")
    run.add_argument("--log-format", choices=("json", "console"),
                     help="default: json unless stdout is a terminal")
    run.add_argument("--log-level", choices=logs.LEVELS, default="info")
    run.set_defaults(handler=_run)

    validate = commands.add_parser(
        "validate", help="check persona, policy and fleet files together",
        description="Check configuration without starting anything; print every error as "
                    "file:line: field: message. A DIR holding personas/ or policies/ is read "
                    "as a config directory; other paths are read as they are.")
    validate.add_argument("paths", nargs="*", type=Path, metavar="DIR",
                          help="directories or files (default: the config directory)")
    _config_dir_option(validate)
    validate.set_defaults(handler=_validate)

    personas = commands.add_parser("personas", help="list personas: role, tier, duties, scopes")
    _config_dir_option(personas)
    personas.add_argument("--json", action="store_true", help="machine-readable output")
    personas.set_defaults(handler=_personas)

    render = commands.add_parser("render", help="render system files from the configuration")
    targets = render.add_subparsers(dest="target", required=True)
    sysusers = targets.add_parser(
        "sysusers", help="a sysusers.d file with one static system user per persona")
    _config_dir_option(sysusers)
    sysusers.set_defaults(handler=_render_sysusers)
    _render_nats_parser(targets)
    _render_rbac_parser(targets)
    _render_host_parsers(targets)

    watch = commands.add_parser(
        "watch", help="a live view of the bus: presence, proposals, votes, decisions, results",
        description="Print every message on zeta.> as it arrives, verified with the keys from "
                    "the configuration; dropped messages are shown with the reason. It waits "
                    "for the bus if it is down; Ctrl-C or SIGTERM stops it.")
    _config_dir_option(watch)
    _bus_options(watch)
    watch.add_argument("--summary-every", type=float, default=30.0, metavar="SECONDS",
                       help="print presence and open proposals this often; 0: never "
                            "(default: 30; never with --json)")
    watch.set_defaults(handler=_watch)

    audit = commands.add_parser(
        "audit", help=f"read the {AUDIT_STREAM} stream: a summary per repair, one repair, "
                      "or verify",
        description=f"Without arguments: one line per repair in {AUDIT_STREAM}. With --repair: "
                    "every message of that repair in order. 'verify': re-check every "
                    "signature and that every executed repair had a valid approving quorum; "
                    "exit 1 listing every violation.")
    audit.add_argument("check", nargs="?", choices=["verify"], help="verify the history")
    audit.add_argument("--repair", metavar="ID", help="only this repair")
    _config_dir_option(audit)
    _bus_options(audit)
    audit.add_argument("--timeout", type=float, default=5.0, metavar="SECONDS",
                       help="give up connecting after this long (default: 5)")
    audit.set_defaults(handler=_audit)

    _keygen_parser(commands)
    _control_parsers(commands)
    _bus_parsers(commands)
    _think_parser(commands)

    version = commands.add_parser("version", help="print the version")
    version.set_defaults(handler=_version)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """The console script: parse, dispatch, and turn user mistakes into exit codes."""
    args = build_parser().parse_args(argv)
    return dispatch("zeta-agent", cast(Handler, args.handler), args)


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
