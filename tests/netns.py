"""Hosts as Linux network namespaces on a private bridge, for tests that cut a host off.

``Network(["h1", "h2", "h3"])`` makes one namespace per host and one more holding a
bridge; each host has a veth pair whose other end is a port of that bridge, an address
``10.77.0.<i>/24`` and its loopback up. Neither the bridge nor the addresses exist in
the machine's own namespace, so nothing a test does reaches the machine's network,
and each host has its own loopback: servers in different hosts may use the same port.

``partition(host)`` sets the host's port on the bridge down: the cable is pulled at
the switch. The host keeps its interface and address, and its processes see only
silence, as across a real network (no reset: TCP on both sides must notice by itself).
``heal(host)`` sets the port up again.

Commands run in a host through ``Host.command`` (``ip netns exec``, plus a UTS
namespace of their own whose hostname is the host's name, so what an agent reports as
its host is the host it runs in). ``Host.call`` runs a function in a thread that has
entered the host's network namespace: a socket it opens belongs to that host.

Names carry a per-run tag with the creating process's pid (``zt-<pid>-<random>-h1``),
so parallel runs do not collide. Everything is removed when the ``with`` block exits,
whatever happened inside it (processes still running in a host are killed first);
namespaces left by a run that was killed outright (its pid no longer runs) are swept
when the next ``Network`` starts.

Needs root, iproute2 (``ip netns``), ``unshare`` (util-linux) and ``hostname``.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import secrets
import shutil
import signal
import subprocess
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TypeVar

T = TypeVar("T")

SUBNET = "10.77.0"
PREFIX = "zt-"
_NETNS_DIR = Path("/run/netns")
_CLONE_NEWNET = 0x40000000
_TAGGED = re.compile(rf"^{PREFIX}(\d+)-[0-9a-f]+-")
_IP_TIMEOUT = 10.0


class NetnsError(RuntimeError):
    """A namespace, link or address could not be set up; the message has ``ip``'s words."""


def prerequisites() -> list[str]:
    """What this machine lacks to make namespaced hosts (empty if nothing)."""
    lacking = []
    if os.geteuid() != 0:
        lacking.append("root (ip netns add needs CAP_SYS_ADMIN)")
    for tool, package in (("ip", "iproute2"), ("unshare", "util-linux"),
                          ("hostname", "hostname")):
        if shutil.which(tool) is None:
            lacking.append(f"`{tool}` (apt-get install {package})")
    return lacking


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, check=False,
                          timeout=_IP_TIMEOUT)
    if check and done.returncode != 0:
        raise NetnsError(f"ip {' '.join(args)}: {done.stderr.strip() or done.returncode}")
    return done


def _kill_inside(netns: str) -> None:
    """SIGKILL whatever still runs in ``netns`` (only processes a Network put there)."""
    listed = _ip("netns", "pids", netns, check=False)
    for pid in listed.stdout.split():
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)


def _remove(netns: str) -> None:
    _kill_inside(netns)
    # Deleting a namespace destroys its veth ends, and with them their peers.
    _ip("netns", "del", netns, check=False)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep() -> list[str]:
    """Remove the namespaces of runs whose process is gone; return their names."""
    if not _NETNS_DIR.is_dir():
        return []
    stale = [p.name for p in _NETNS_DIR.iterdir()
             if (m := _TAGGED.match(p.name)) is not None and not _pid_alive(int(m.group(1)))]
    for name in stale:
        _remove(name)
    return stale


_libc = ctypes.CDLL(None, use_errno=True)


def _enter(netns: str) -> None:
    """Move the calling thread (only it) into ``netns``."""
    fd = os.open(_NETNS_DIR / netns, os.O_RDONLY)
    try:
        if _libc.setns(fd, _CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise NetnsError(f"setns into {netns}: {os.strerror(err)}")
    finally:
        os.close(fd)


@dataclass(frozen=True)
class Host:
    """One namespaced host: its name, namespace, address, and its port on the bridge."""

    name: str
    netns: str
    address: str
    port: str  # the veth end in the bridge's namespace

    def command(self, argv: Sequence[str]) -> list[str]:
        """``argv`` as a command that runs in this host, under this host's hostname."""
        return ["ip", "netns", "exec", self.netns, "unshare", "--uts", "sh", "-c",
                'hostname "$0" && exec "$@"', self.name, *argv]

    def call(self, fn: Callable[[], T]) -> T:
        """``fn()`` in a new thread inside this host's network; its result or its exception.

        A fresh thread each time: a thread that changed namespace is never reused.
        """
        result: list[T] = []
        failure: list[BaseException] = []

        def run() -> None:
            try:
                _enter(self.netns)
                result.append(fn())
            except BaseException as exc:  # handed to the caller's thread
                failure.append(exc)

        thread = threading.Thread(target=run, name=f"in-{self.name}", daemon=True)
        thread.start()
        thread.join()
        if failure:
            raise failure[0]
        return result[0]


class Network:
    """Hosts on one bridge, each in its own network namespace (see the module docstring)."""

    def __init__(self, names: Sequence[str]) -> None:
        if len(set(names)) != len(names) or not 0 < len(names) < 250:
            raise ValueError(f"host names must be distinct, 1 to 249 of them: {names}")
        self.tag = f"{PREFIX}{os.getpid()}-{secrets.token_hex(3)}"
        self.bridge_netns = f"{self.tag}-br"
        self.hosts = {
            name: Host(name=name, netns=f"{self.tag}-{name}", address=f"{SUBNET}.{i}",
                       port=f"p{i}")
            for i, name in enumerate(names, start=1)}
        self._made: list[str] = []

    def __enter__(self) -> Network:
        sweep()
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _add(self, netns: str) -> None:
        _ip("netns", "add", netns)
        self._made.append(netns)
        _ip("-n", netns, "link", "set", "lo", "up")

    def _build(self) -> None:
        br = self.bridge_netns
        self._add(br)
        _ip("-n", br, "link", "add", "br0", "type", "bridge")
        _ip("-n", br, "link", "set", "br0", "up")
        for host in self.hosts.values():
            self._add(host.netns)
            # Both ends are created straight in their namespaces: no name is ever
            # taken in the machine's own namespace, where runs could collide.
            _ip("link", "add", "eth0", "netns", host.netns, "type", "veth",
                "peer", "name", host.port, "netns", br)
            _ip("-n", br, "link", "set", host.port, "master", "br0")
            _ip("-n", br, "link", "set", host.port, "up")
            _ip("-n", host.netns, "addr", "add", f"{host.address}/24", "dev", "eth0")
            _ip("-n", host.netns, "link", "set", "eth0", "up")

    def partition(self, name: str) -> None:
        """Cut ``name`` off the others (its bridge port down)."""
        _ip("-n", self.bridge_netns, "link", "set", self.hosts[name].port, "down")

    def heal(self, name: str) -> None:
        """Reconnect ``name`` (its bridge port up)."""
        _ip("-n", self.bridge_netns, "link", "set", self.hosts[name].port, "up")

    def close(self) -> None:
        """Kill what still runs in the hosts and delete every namespace; idempotent."""
        while self._made:
            _remove(self._made.pop())
