"""The sd_notify protocol, spoken directly: one datagram per message to ``$NOTIFY_SOCKET``.

systemd's protocol is small enough that a dependency would cost more than it saves:
newline-separated ``KEY=VALUE`` assignments in one datagram to a unix socket whose
address systemd passes in the environment (a path, or an abstract name written with
a leading ``@``). Outside systemd the variable is unset and every call is a no-op, so
the agent runs the same under ``systemctl`` and in a terminal.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from datetime import timedelta

import structlog

log = structlog.get_logger()


SERVICE_MANAGER_VARIABLES = frozenset({"NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"})


def child_environment(environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """The agent's environment without its line to the service manager, for children.

    systemd's own tools report a failure on ``$NOTIFY_SOCKET`` when they find one
    (``ERRNO=…``): a ``systemctl`` the agent runs would speak for the agent, and where
    nobody drains the socket (a test harness, not systemd) it blocks on the send.
    """
    return {k: v for k, v in environ.items() if k not in SERVICE_MANAGER_VARIABLES}


class Notifier:
    """Sends sd_notify messages; silently does nothing when there is no socket."""

    def __init__(self, address: str | None) -> None:
        self.address = address or None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> Notifier:
        """The notifier for the socket systemd named in ``$NOTIFY_SOCKET``, if any."""
        return cls(environ.get("NOTIFY_SOCKET"))

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, *assignments: str) -> bool:
        """Send ``KEY=VALUE`` assignments in one datagram; True if it was delivered.

        A failed send is logged, never raised: losing a notification must not take the
        agent down (systemd's own ``sd_notify`` returns an error code for the same reason).
        """
        if self.address is None:
            return False
        target = "\0" + self.address[1:] if self.address.startswith("@") else self.address
        payload = "\n".join(assignments).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                # Never block the event loop on a slow or wedged service manager.
                sock.setblocking(False)
                sock.sendto(payload, target)
        except OSError as exc:
            log.warning("sd_notify failed", socket=self.address, error=str(exc))
            return False
        return True

    def ready(self) -> bool:
        return self.notify("READY=1")

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def stopping(self) -> bool:
        return self.notify("STOPPING=1")

    def status(self, text: str) -> bool:
        # A newline would end the STATUS= assignment and start a bogus one.
        return self.notify("STATUS=" + " ".join(text.split()))


def watchdog_interval(environ: Mapping[str, str] = os.environ,
                      pid: int | None = None) -> timedelta | None:
    """The watchdog timeout systemd expects us to beat, or None when there is none.

    ``WATCHDOG_PID``, when set, names the process the watchdog is meant for; a child
    that inherited the environment must not ping on its parent's behalf.
    """
    usec = environ.get("WATCHDOG_USEC", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    owner = environ.get("WATCHDOG_PID")
    if owner is not None and owner != str(os.getpid() if pid is None else pid):
        return None
    return timedelta(microseconds=int(usec))
