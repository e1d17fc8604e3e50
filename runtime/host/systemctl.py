"""The one way the agent runs ``systemctl``: an explicit argument list, a timeout, never a
shell, and its errors named (polkit's refusals apart). The unit observer and the host
actuators both go through ``Systemctl``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass

from runtime.host.notify import child_environment
from runtime.model.snapshot import UnitObs

SYSTEMCTL = "systemctl"
CALL_TIMEOUT = 20.0
"""Seconds to wait for ``systemctl start|restart``, which waits for systemd's job.

Short enough that the tick carrying the repair stays within the agent's own watchdog
bound; a job still running then goes on in systemd, and the unit's state says so."""
SHOW_TIMEOUT = 5.0
POLKIT_DENIALS = ("Access denied", "Interactive authentication required")
"""What systemctl prints when polkit (or D-Bus policy) refuses the call."""


UNIT_PROPERTIES = ("Id", "LoadState", "ActiveState", "SubState", "NRestarts")


def show_properties(text: str) -> list[dict[str, str]]:
    """``systemctl show`` output as one dict of properties per unit (blank-line-separated)."""
    return [dict(line.partition("=")[::2] for line in block.splitlines() if "=" in line)
            for block in text.strip().split("\n\n")]


def parse_show(text: str) -> tuple[UnitObs, ...]:
    """Parse ``systemctl show --property=…`` output: one blank-line-separated block per unit."""
    units = []
    for fields in show_properties(text):
        if not fields.get("Id"):
            continue
        restarts = fields.get("NRestarts", "")
        units.append(UnitObs(
            name=fields["Id"],
            load_state=fields.get("LoadState", ""),
            active_state=fields.get("ActiveState", ""),
            sub_state=fields.get("SubState", ""),
            # Only services count restarts; other unit types leave it empty.
            n_restarts=int(restarts) if restarts.isdigit() else 0,
        ))
    return tuple(units)


class SystemctlError(Exception):
    """A systemctl call failed; names the call and systemctl's own words."""

    def __init__(self, argv: Sequence[str], message: str) -> None:
        self.command = " ".join(argv)
        self.message = message
        super().__init__(f"`{self.command}`: {message}")


class PolkitDeniedError(SystemctlError):
    """polkit said no: the installed rules do not match the persona's scopes."""


class SystemctlTimeoutError(SystemctlError):
    """systemctl did not answer in time (systemd's job may still be running)."""


@dataclass(frozen=True)
class UnitState:
    """One unit as ``systemctl show`` describes it."""

    unit: UnitObs
    file_state: str  # UnitFileState: enabled, disabled, masked, static, … ("" if none)

    @property
    def exists(self) -> bool:
        return self.unit.load_state not in ("not-found", "")

    def __str__(self) -> str:
        u = self.unit
        enabled = f", {self.file_state}" if self.file_state else ""
        return (f"{u.name}: {u.load_state}, {u.active_state}/{u.sub_state}{enabled}, "
                f"{u.n_restarts} restarts")


class Systemctl:
    """Runs ``systemctl`` with an explicit argument list and a timeout; never a shell."""

    def __init__(self, binary: str = SYSTEMCTL, *, call_timeout: float = CALL_TIMEOUT,
                 show_timeout: float = SHOW_TIMEOUT) -> None:
        self.binary = binary
        self.call_timeout = call_timeout
        self.show_timeout = show_timeout

    def argv(self, verb: str, unit: str | None = None) -> list[str]:
        """The command line for a change: no password prompt, and "--" before the unit."""
        return [self.binary, "--no-ask-password", verb, *(("--", unit) if unit else ())]

    async def show(self, unit: str) -> UnitState:
        """Read ``unit``'s state; a unit systemd does not know has LoadState ``not-found``."""
        argv = self._show_argv((*UNIT_PROPERTIES, "UnitFileState"), [unit])
        out = await self._call(argv, self.show_timeout)
        units = parse_show(out)
        if len(units) != 1:
            raise SystemctlError(argv, f"expected one unit in the output, got {len(units)}")
        return UnitState(units[0], show_properties(out)[0].get("UnitFileState", ""))

    async def show_units(self, units: Sequence[str], *, within: float) -> tuple[UnitObs, ...]:
        """The states of ``units`` in one call (the unit observer's, every tick)."""
        return parse_show(await self._call(self._show_argv(UNIT_PROPERTIES, units), within))

    def _show_argv(self, properties: Sequence[str], units: Sequence[str]) -> list[str]:
        # "--" ends the options: unit names come from policy files, not from us.
        return [self.binary, "show", "--no-pager", f"--property={','.join(properties)}",
                "--", *units]

    async def change(self, verb: str, unit: str | None = None) -> None:
        """``systemctl --no-ask-password VERB [-- UNIT]``; raises SystemctlError on failure."""
        await self._call(self.argv(verb, unit), self.call_timeout)

    async def _call(self, argv: list[str], within: float) -> str:
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=child_environment())
        except OSError as exc:
            raise SystemctlError(argv, f"cannot run it: {exc.strerror or exc}") from exc
        try:
            async with asyncio.timeout(within):
                out, err = await proc.communicate()
        except TimeoutError:
            # Killing the client does not cancel systemd's job: the unit's state says how
            # it went, and the caller reads it.
            proc.kill()
            await proc.wait()
            raise SystemctlTimeoutError(argv, f"no answer within {within:g}s") from None
        if proc.returncode != 0:
            message = " ".join(err.decode(errors="replace").split()) or "no message"
            kind = (PolkitDeniedError if any(d in message for d in POLKIT_DENIALS)
                    else SystemctlError)
            raise kind(argv, f"exit {proc.returncode}: {message}")
        return out.decode(errors="replace")
