"""``zeta-agent``: the command line, parsing and dispatch only.

Each command's handler sits with its command in ``runtime.ops``: ``run``, ``validate``
(and ``personas``, ``version``), ``render.commands``, ``watch``, ``audit``, ``controls``
(keygen, bus init and check, freeze, thaw, pause, breaker reset) and ``think``.

User mistakes (a missing directory, a bad file, an unknown persona) end with a clear
message on stderr and a non-zero exit, never a traceback. Exit codes, the same for
every command and named in each one's ``--help``: 0 success; 1 the command ran and
found something (``validate`` errors, ``audit verify`` violations, ``bus check``
differences); 2 it could not do its work (bad usage, a configuration that does not
load, an unreadable file, an unreachable bus), so a systemd unit can stop restarting
on it with ``RestartPreventExitStatus=2``; 130 interrupted.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from typing import TypeAlias, cast

import shtab

from bus.jetstream import AUDIT_STREAM
from runtime import __version__
from runtime.agent import logs
from runtime.model.durations import parse_duration
from runtime.model.formats import check_bus_url
from runtime.ops.audit import audit_command
from runtime.ops.common import (
    CONFIG_ENV,
    DEFAULT_CONFIG_DIR,
    Handler,
    dispatch,
    exit_codes,
)
from runtime.ops.controls import bus_resources_command, control_command, keygen_command
from runtime.ops.render.commands import (
    DEFAULT_NATS_LISTEN,
    DEFAULT_NATS_STORE,
    render_nats_command,
    render_polkit_command,
    render_rbac_command,
    render_sysusers_command,
    render_unit_command,
)
from runtime.ops.run import run_command
from runtime.ops.think import think_command
from runtime.ops.validate import personas_command, validate_command, version_command
from runtime.ops.watch import watch_command

# ---------------------------------------------------------------- argument types


def _listen(value: str) -> str:
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}")
    return value


def _bus_url(value: str) -> str:
    try:
        return check_bus_url(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _text(value: str) -> str:
    if not value.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return value


def _think_parser(commands: Commands) -> None:
    think = _add(commands,
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
    think.set_defaults(handler=think_command)


# ---------------------------------------------------------------- parser


def _bus_url_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bus", action="append", metavar="URL", type=_bus_url,
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

# What exit status 1 means, for the commands where it means something.
FINDINGS = {
    "run": "the agent stopped on an unexpected error, or --once's tick raised (systemd "
           "restarts it)",
    "validate": "the configuration has errors, each printed as file:line: field: message",
    "audit": "'verify' found violations, or --repair has no messages",
    "check": "the bus resources differ from fleet.yaml",
    "init": "differences remain after creating what was missing",
    "think": "the model was unavailable",
}


def _add(commands: Commands, name: str, *, help: str,
         description: str | None = None) -> argparse.ArgumentParser:
    """A subcommand whose --help ends with its exit codes."""
    return commands.add_parser(name, help=help, description=description,
                               epilog=exit_codes(FINDINGS.get(name)))


def _output_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-o", "--output", type=Path, metavar="FILE",
                        help="write FILE whole (temporary file, fsync, rename) instead of "
                             "stdout; on any error FILE is left as it was")


def _render_nats_parser(targets: Commands) -> None:
    nats = _add(targets,
        "nats", help="a nats-server config: JetStream and one nkey user per persona, "
                     "operator and watcher, each allowed to publish only its own subjects")
    _config_dir_option(nats)
    nats.add_argument("--listen", type=_listen, default=DEFAULT_NATS_LISTEN,
                      metavar="HOST:PORT",
                      help=f"client address (default: {DEFAULT_NATS_LISTEN})")
    nats.add_argument("--store-dir", type=Path, default=DEFAULT_NATS_STORE, metavar="DIR",
                      help=f"JetStream's store (default: {DEFAULT_NATS_STORE})")
    _output_option(nats)
    nats.set_defaults(handler=render_nats_command)


def _persona_or_all(command: argparse.ArgumentParser, *, every: str) -> None:
    which = command.add_mutually_exclusive_group(required=True)
    which.add_argument("persona", nargs="?", help="the persona's name, e.g. otto")
    which.add_argument("--all", action="store_true", help=every)
    _config_dir_option(command)
    _output_option(command)


def _render_rbac_parser(targets: Commands) -> None:
    command = _add(targets,
        "rbac", help="Kubernetes ClusterRole and ClusterRoleBinding for a persona's user, "
                     "with exactly the verbs its scopes need")
    _persona_or_all(command, every="every persona, one after another")
    command.set_defaults(handler=render_rbac_command)


def _render_host_parsers(targets: Commands) -> None:
    polkit = _add(targets,
        "polkit", help="polkit rules letting a persona's user start or restart exactly the "
                       "units its scopes name (and reboot only with host:node:reboot)")
    _persona_or_all(polkit, every="every persona, in one file")
    polkit.set_defaults(handler=render_polkit_command)
    unit = _add(targets,
        "unit", help="the drop-in for zeta-agent@PERSONA.service: credentials and limits")
    unit.add_argument("persona", help="the persona's name, e.g. otto")
    _config_dir_option(unit)
    unit.add_argument("--credentials-dir", type=Path, metavar="DIR",
                      help="where the persona's credentials are, in PERSONA/ "
                           "(default: the fleet's credentialsDir)")
    _output_option(unit)
    unit.set_defaults(handler=render_unit_command)


def _keygen_parser(commands: Commands) -> None:
    keygen = _add(commands,
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
    keygen.set_defaults(handler=keygen_command)


def _bus_parsers(commands: Commands) -> None:
    bus = _add(commands,
        "bus", help="create or check the audit stream and lease bucket (operators)",
        description="Agents only check the bus resources and refuse destructive work while "
                    "they differ from fleet.yaml; an operator creates and changes them.")
    actions = bus.add_subparsers(dest="action", required=True, metavar="ACTION")
    for action, summary in (
            ("init", "create the audit stream and lease bucket if missing, then check them"),
            ("check", "say how they differ from fleet.yaml (changes nothing; exit 1 if any)")):
        command = _add(actions, action, help=summary,
                       description=summary[0].upper() + summary[1:] + ".")
        command.add_argument("--operator", metavar="NAME",
                             help="authenticate as this operator (its seed from "
                                  "<credentialsDir>/NAME/nkey.seed)")
        command.add_argument("--seed", type=Path, metavar="FILE",
                             help="authenticate with this nkey seed")
        _config_dir_option(command)
        _bus_url_option(command)
        command.add_argument("--timeout", type=float, default=10.0, metavar="SECONDS",
                             help="give up after this long (default: 10)")
        command.set_defaults(handler=bus_resources_command)


def _duration(value: str) -> timedelta:
    try:
        return parse_duration(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _control_parsers(commands: Commands) -> None:
    for verb, summary in (("freeze", "stop all destructive work fleet-wide"),
                          ("thaw", "resume destructive work after a freeze"),
                          ("breaker-reset", "close a policy's tripped circuit breaker"),
                          ("pause", "hold a policy's repairs (or all) for a while; they "
                                    "resume by themselves"),
                          ("resume", "lift a pause before it lapses")):
        command = _add(commands,
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
        if verb in ("pause", "resume"):
            which = command.add_mutually_exclusive_group(required=True)
            which.add_argument("--policy", metavar="P", help="only this policy's repairs")
            which.add_argument("--all", action="store_true", help="every policy's repairs")
        if verb == "pause":
            command.add_argument("--for", dest="duration", required=True, type=_duration,
                                 metavar="DURATION",
                                 help="how long, e.g. 30m or 2h (at most 7d); compensations "
                                      "(uncordon, lease release) still run")
        command.add_argument("--seed", type=Path, metavar="FILE",
                             help="the operator's nkey seed "
                                  "(default: <credentialsDir>/NAME/nkey.seed)")
        _config_dir_option(command)
        _bus_url_option(command)
        command.add_argument("--timeout", type=float, default=5.0, metavar="SECONDS",
                             help="give up reaching the bus after this long (default: 5)")
        command.set_defaults(handler=control_command, verb=verb)


def build_parser() -> argparse.ArgumentParser:
    """The ``zeta-agent`` argument parser, every subcommand included."""
    parser = argparse.ArgumentParser(prog="zeta-agent", description=(
        "Out-of-band repair agents for Kubernetes: named personas under systemd that "
        "act only within their scopes, and destructive actions only with a quorum."),
        epilog=exit_codes("a command found something (see the command's --help)"))
    parser.add_argument("--version", action="version", version=f"zeta-agent {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    run = _add(commands, "run", help="run one persona's agent (what systemd starts)",
                              description="Run the agent of PERSONA until SIGTERM.")
    run.add_argument("persona", help="the persona's name, e.g. otto")
    _config_dir_option(run)
    run.add_argument("--once", action="store_true",
                     help="run one tick and exit: 0 if it completed, 1 if it raised")
    run.add_argument("--log-format", choices=("json", "console"),
                     help="default: json unless stdout is a terminal")
    run.add_argument("--log-level", choices=logs.LEVELS, default="info")
    run.set_defaults(handler=run_command)

    validate = _add(commands,
        "validate", help="check persona, policy and fleet files together",
        description="Check configuration without starting anything; print every error as "
                    "file:line: field: message. A DIR holding personas/ or policies/ is read "
                    "as a config directory; other paths are read as they are.")
    validate.add_argument("paths", nargs="*", type=Path, metavar="DIR",
                          help="directories or files (default: the config directory)")
    _config_dir_option(validate)
    validate.add_argument("--json", action="store_true",
                          help="one JSON object on stdout: ok, counts and every error with "
                               "file, line, field and message")
    validate.set_defaults(handler=validate_command)

    personas = _add(commands, "personas", help="list personas: role, tier, duties, scopes")
    _config_dir_option(personas)
    personas.add_argument("--json", action="store_true", help="machine-readable output")
    personas.set_defaults(handler=personas_command)

    render = _add(commands, "render", help="render system files from the configuration")
    targets = render.add_subparsers(dest="target", required=True)
    sysusers = _add(targets,
        "sysusers", help="a sysusers.d file with one static system user per persona")
    _config_dir_option(sysusers)
    _output_option(sysusers)
    sysusers.set_defaults(handler=render_sysusers_command)
    _render_nats_parser(targets)
    _render_rbac_parser(targets)
    _render_host_parsers(targets)

    watch = _add(commands,
        "watch", help="a live view of the bus: presence, proposals, votes, decisions, results",
        description="Print every message on zeta.> as it arrives, verified with the keys from "
                    "the configuration; dropped messages are shown with the reason. It waits "
                    "for the bus if it is down; Ctrl-C or SIGTERM stops it.")
    _config_dir_option(watch)
    _bus_options(watch)
    watch.add_argument("--summary-every", type=float, default=30.0, metavar="SECONDS",
                       help="print presence and open proposals this often; 0: never "
                            "(default: 30; never with --json)")
    watch.set_defaults(handler=watch_command)

    audit = _add(commands,
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
    audit.set_defaults(handler=audit_command)

    _keygen_parser(commands)
    _control_parsers(commands)
    _bus_parsers(commands)
    _think_parser(commands)

    version = _add(commands, "version", help="print the version")
    version.set_defaults(handler=version_command)

    completion = _add(commands,
        "completion", help="print a shell completion script (bash, zsh or tcsh)",
        description="Print a completion script for every command and option. bash: "
                    "`zeta-agent completion bash > /etc/bash_completion.d/zeta-agent`; zsh: "
                    "`zeta-agent completion zsh > \"${fpath[1]}/_zeta-agent\"`.")
    completion.add_argument("shell", choices=("bash", "zsh", "tcsh"))
    completion.set_defaults(handler=lambda args: completion_command(parser, args))
    return parser


def completion_command(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    # shtab writes the script from the parser itself, so it can never miss an option.
    print(shtab.complete(parser, shell=args.shell), end="")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """The console script: parse, dispatch, and turn user mistakes into exit codes."""
    args = build_parser().parse_args(argv)
    return dispatch("zeta-agent", cast(Handler, args.handler), args)
