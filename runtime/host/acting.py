"""Host actuators: start or restart a systemd unit, reboot the host, restart a peer agent.

Everything goes through ``systemctl`` run as the persona's own user with a fixed
argument list (never a shell): ``systemctl --no-ask-password restart -- k3s.service``.
systemd asks polkit over D-Bus whether that user may do it, and the rules file
``zeta-agent render polkit`` writes grants exactly what the persona's scopes name. So
a host repair is checked three times: by ``authorize`` before the intent gets here, by
the actuator itself (the same ``scopes.allows`` on the same scope) right before it
calls, and by polkit.

Each actuator first reads the unit (``systemctl show``): a unit that does not exist
here fails the repair, and a dry run stops there, saying what would have run. Then
``fence()``, the call, and a second read to verify what the unit did. A polkit
refusal ("Access denied", "Interactive authentication required") is a mismatch
between the persona's scopes and the installed rules, reported as such and never
retried: asking again gets the same answer.

Only the process systemd itself started gets host actuators (``$SYSTEMD_EXEC_PID`` is
its own PID): an agent run from a terminal, by the lab or by a test, even on a host
or a CI runner that systemd manages, never touches this host's units.
"""

from __future__ import annotations

import os
import re
import socket
from abc import ABC, abstractmethod
from collections.abc import Mapping

import structlog

from bus.subjects import PERSONA_NAME
from runtime.core.engine import Intent
from runtime.core.ports import Actuator, Fence, Outcome
from runtime.host.systemctl import (
    PolkitDeniedError,
    Systemctl,
    SystemctlError,
    SystemctlTimeoutError,
    UnitState,
)
from runtime.model.catalog import UnitParams
from runtime.model.formats import Persona
from runtime.model.scopes import ScopeError, allows

log = structlog.get_logger()

AGENT_UNIT = "zeta-agent@{persona}.service"
"""The unit of a persona's agent (systemd/zeta-agent@.service)."""
UNIT_VERBS: Mapping[str, str] = {"host.unit.start": "start", "host.unit.restart": "restart"}
"""The systemctl verb of each unit action: also polkit's ``action.lookup("verb")``."""
PEER_VERB = "restart"
RUNNING = ("active", "activating", "reloading")
REVOKED = ("disabled", "masked", "masked-runtime")
"""UnitFileState of an agent an operator has revoked (``systemctl disable --now``)."""

# systemd's unit name grammar (src/basic/unit-name.c): a prefix of these characters,
# at most one '@' (then an instance, which may hold '@' too), a known type suffix, and
# at most 255 characters in all.
UNIT_TYPES = ("service", "socket", "target", "device", "mount", "automount", "swap", "timer",
              "path", "slice", "scope")
UNIT_NAME_MAX = 255
_UNIT_NAME = re.compile(r"^[A-Za-z0-9:_.\\-]+(@[A-Za-z0-9:_.\\@-]+)?"
                        r"\.(" + "|".join(UNIT_TYPES) + ")$")


def unit_name_error(name: str) -> str | None:
    """Why ``name`` is not a concrete systemd unit name (a template is not), or None."""
    if len(name) > UNIT_NAME_MAX:
        return f"{name[:40]!r}…: longer than {UNIT_NAME_MAX} characters"
    if not _UNIT_NAME.match(name):
        return (f"{name!r} is not a unit name: [A-Za-z0-9:_.\\-] characters, an optional "
                f"@instance, and a suffix ({', '.join(UNIT_TYPES)})")
    return None


def agent_unit(persona: str) -> str:
    """``zeta-agent@<persona>.service``; raises ValueError for a name no persona can have."""
    if not PERSONA_NAME.match(persona):
        raise ValueError(f"{persona!r} is not a persona name")
    return AGENT_UNIT.format(persona=persona)


# ---------------------------------------------------------------- actuators


class RefusedError(Exception):
    """The actuator will not act on this intent, for the reason given."""


class HostActuator(ABC):
    """What every host actuator shares: the scope check, errors as Outcomes, verification."""

    action: str

    def __init__(self, systemctl: Systemctl, persona: Persona, *, host: str) -> None:
        self.systemctl = systemctl
        self.persona = persona
        self.host = host

    @property
    def user(self) -> str:
        """The OS user the unit runs the persona as (systemd/zeta-agent@.service)."""
        return f"zeta-{self.persona.name}"

    async def run(self, intent: Intent, *, repair: str, dry_run: bool, fence: Fence) -> Outcome:
        """Carry out ``intent``; never raises a systemctl error, reports it."""
        with structlog.contextvars.bound_contextvars(repair=repair, action=intent.action.name,
                                                     target=intent.target.key):
            try:
                scope = self._check_scope(intent)
            except RefusedError as exc:
                return Outcome(False, f"refused: {exc}")
            try:
                return await self._act(intent, dry_run=dry_run, fence=fence)
            except RefusedError as exc:
                return Outcome(False, f"refused: {exc}")
            except PolkitDeniedError as exc:
                return Outcome(False, (
                    f"scope/polkit mismatch: {self.persona.name}'s scopes allow {scope}, but "
                    f"polkit refused {self.user} `{exc.command}` ({exc.message}); install "
                    f"`zeta-agent render polkit {self.persona.name}` in /etc/polkit-1/rules.d"))
            except SystemctlError as exc:
                return Outcome(False, str(exc))

    def _check_scope(self, intent: Intent) -> str:
        """The scope this intent needs, if the persona holds it: the runtime check, again."""
        try:
            scope = intent.action.scope_for(intent.target, intent.params)
            granted = allows(self.persona.spec.effective_scopes, scope)
        except ScopeError as exc:
            raise RefusedError(f"no scope can grant this target: {exc}") from None
        if not granted:
            raise RefusedError(f"scope {scope} is not granted to {self.persona.name}")
        return scope

    async def _existing(self, unit: str) -> UnitState:
        state = await self.systemctl.show(unit)
        if not state.exists:
            raise RefusedError(f"{unit} does not exist on {self.host}")
        return state

    async def _change(self, verb: str, unit: str, *, fence: Fence) -> str:
        """Fence, then ``systemctl VERB -- UNIT``; a call that outlived its timeout is
        not a failure yet: the state read afterwards tells."""
        if not await fence():
            raise RefusedError(f"fencing token stale: stopped before `{verb} {unit}`")
        try:
            await self.systemctl.change(verb, unit)
        except SystemctlTimeoutError:
            log.warning("systemctl still waiting for its job; reading the unit", unit=unit)
            return f" (systemctl gave up waiting after {self.systemctl.call_timeout:g}s)"
        log.info("host change made", verb=verb, unit=unit)
        return ""

    async def _verified(self, verb: str, unit: str, note: str) -> Outcome:
        after = await self.systemctl.show(unit)
        ok = after.unit.active_state in RUNNING
        said = f"{verb}ed {unit}" if ok else f"{verb} of {unit} did not leave it running"
        return Outcome(ok, f"{said}{note}; now {after}")

    def _would(self, verb: str, unit: str | None, state: UnitState | None) -> Outcome:
        command = " ".join(self.systemctl.argv(verb, unit))
        now = f"; now {state}" if state is not None else ""
        return Outcome(True, f"dry-run: would run `{command}` as {self.user}{now}")

    def _on_this_host(self, host: str | None, what: str) -> None:
        if host is not None and host != self.host:
            raise RefusedError(f"{what} is on {host}; this agent runs on {self.host} and acts on "
                          "its own host only")

    @abstractmethod
    async def _act(self, intent: Intent, *, dry_run: bool, fence: Fence) -> Outcome:
        """The actuator's own work; RefusedError and SystemctlError propagate to ``run``."""


class UnitChange(HostActuator):
    """``host.unit.start`` / ``host.unit.restart``: one unit of this host."""

    def __init__(self, systemctl: Systemctl, persona: Persona, *, host: str, action: str) -> None:
        super().__init__(systemctl, persona, host=host)
        self.action = action
        self.verb = UNIT_VERBS[action]

    async def _act(self, intent: Intent, *, dry_run: bool, fence: Fence) -> Outcome:
        assert isinstance(intent.params, UnitParams)
        unit = intent.params.unit
        if problem := unit_name_error(unit):
            raise RefusedError(problem)
        self._on_this_host(intent.target.host, unit)
        state = await self._existing(unit)
        if self.verb == "start" and state.unit.active_state in RUNNING:
            # start only ever brings up what was down; it never interrupts a running unit.
            return Outcome(True, f"{unit} is already {state.unit.active_state}: not started")
        if dry_run:
            return self._would(self.verb, unit, state)
        note = await self._change(self.verb, unit, fence=fence)
        return await self._verified(self.verb, unit, note)


class PeerRestart(HostActuator):
    """``agent.peer.restart``: restart ``zeta-agent@<peer>.service`` on this host.

    An agent an operator revoked (``systemctl disable --now``) stays down: a disabled
    or masked unit is refused, so mutual repair can never undo a revocation.
    """

    action = "agent.peer.restart"

    async def _act(self, intent: Intent, *, dry_run: bool, fence: Fence) -> Outcome:
        peer = intent.target.name
        try:
            unit = agent_unit(peer)
        except ValueError as exc:
            raise RefusedError(str(exc)) from None
        if peer == self.persona.name:
            raise RefusedError("an agent does not restart itself: the call would end it mid-repair")
        state = await self._existing(unit)
        if state.file_state in REVOKED:
            raise RefusedError(f"{unit} is {state.file_state}: an operator revoked it, "
                               "it stays down")
        if dry_run:
            return self._would(PEER_VERB, unit, state)
        note = await self._change(PEER_VERB, unit, fence=fence)
        return await self._verified(PEER_VERB, unit, note)


class Reboot(HostActuator):
    """``host.node.reboot``: ``systemctl reboot`` of this host, through logind and polkit.

    Nothing can be verified from inside a host that is going down; peers see it leave
    and come back. logind honours inhibitors (an upgrade in progress) because the
    polkit rule does not grant ``reboot-ignore-inhibit``.
    """

    action = "host.node.reboot"

    async def _act(self, intent: Intent, *, dry_run: bool, fence: Fence) -> Outcome:
        self._on_this_host(intent.target.name, "the host to reboot")
        if dry_run:
            return self._would("reboot", None, None)
        if not await fence():
            raise RefusedError("fencing token stale: stopped before `reboot`")
        await self.systemctl.change("reboot")
        log.warning("host reboot requested", host=self.host)
        return Outcome(True, f"reboot of {self.host} requested")


def host_actuators(persona: Persona, environ: Mapping[str, str], *,
                   systemctl: Systemctl | None = None, host: str | None = None,
                   pid: int | None = None) -> dict[str, Actuator]:
    """The host actuators, acting as ``persona``, when systemd started this very process.

    systemd (248 and later) sets ``$SYSTEMD_EXEC_PID`` to the PID it executed; a child
    of a systemd-managed process (a test runner, the lab) inherits the variable with
    another PID, and gets none, like a process outside systemd.
    """
    if environ.get("SYSTEMD_EXEC_PID") != str(os.getpid() if pid is None else pid):
        return {}
    systemctl = systemctl or Systemctl()
    host = host or socket.gethostname()
    actuators: dict[str, Actuator] = {
        action: UnitChange(systemctl, persona, host=host, action=action)
        for action in UNIT_VERBS}
    actuators[PeerRestart.action] = PeerRestart(systemctl, persona, host=host)
    actuators[Reboot.action] = Reboot(systemctl, persona, host=host)
    return actuators
