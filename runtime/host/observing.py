"""What an agent sees from its own host: systemd units, host health, the API server's ports.

The host's observers, behind ``runtime.core.ports.Observer``: ``systemctl show`` for the
units the policies name, ``/proc`` and the state directory's disk for health, and TCP
connects and ``GET /readyz`` to every API server URL (no Kubernetes client: the
network path is evidence of its own).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import ssl
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit

import structlog

from bus.messages import NodeReport
from runtime.core.evidence import HEALTHY
from runtime.core.ports import Domain, Observed, Observer, ProbeSource
from runtime.host.systemctl import Systemctl, SystemctlError
from runtime.model.catalog import UnitParams
from runtime.model.formats import Fleet, HostEvidence, RepairPolicy, UnitFailedDetect
from runtime.model.snapshot import ApiProbe, HostHealth, SourceStatus

log = structlog.get_logger()
T = TypeVar("T")


# ---------------------------------------------------------------- systemd units


def watched_units(policies: Iterable[RepairPolicy]) -> tuple[str, ...]:
    """Every unit the policies name: in unit-failed detectors and in host.unit.* remedies."""
    units: set[str] = set()
    for policy in policies:
        if isinstance(policy.spec.detect, UnitFailedDetect):
            units.update(policy.spec.detect.units)
        for remedy in policy.spec.remedies:
            params = remedy.typed_params()
            if isinstance(params, UnitParams):
                units.add(params.unit)
    return tuple(sorted(units))


class UnitObserver:
    """The state of the systemd units this persona's policies care about."""

    name = "units"
    provides: frozenset[Domain] = frozenset({"units"})

    def __init__(self, units: Sequence[str], *, systemctl: Systemctl | None = None,
                 timeout: float = 3.0) -> None:
        self.units = tuple(units)
        self.systemctl = systemctl or Systemctl()
        self.timeout = timeout

    async def observe(self, now: datetime) -> Observed:
        try:
            units = await self.systemctl.show_units(self.units, within=self.timeout)
        except SystemctlError as exc:
            return _failed(str(exc))
        return Observed({"units": units}, SourceStatus(ok=True, detail=f"{len(units)} units"))


def _failed(detail: str) -> Observed:
    return Observed({}, SourceStatus(ok=False, detail=detail))


# ---------------------------------------------------------------- node health


def _free_fraction(path: Path) -> float:
    stat = os.statvfs(path)
    return stat.f_bavail / stat.f_blocks if stat.f_blocks else 0.0


def parse_meminfo(text: str) -> float | None:
    """MemAvailable / MemTotal from /proc/meminfo, or None if either is missing."""
    values = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        number = rest.split()[0] if rest.split() else ""
        if number.isdigit():
            values[key] = int(number)
    total, available = values.get("MemTotal"), values.get("MemAvailable")
    return available / total if total and available is not None else None


def parse_pressure(text: str) -> float | None:
    """The ``some avg10`` value of a /proc/pressure file, or None if absent."""
    for line in text.splitlines():
        kind, *fields = line.split()
        if kind == "some":
            for name, _, value in (f.partition("=") for f in fields):
                if name == "avg10":
                    return float(value)
    return None


class HealthObserver:
    """Disk, memory and memory pressure of this host, from statvfs and /proc."""

    name = "health"
    provides: frozenset[Domain] = frozenset({"health"})

    def __init__(self, state_dir: Path, *, proc: Path = Path("/proc"),
                 root: Path = Path("/")) -> None:
        self.paths = tuple(dict.fromkeys((root, state_dir)))
        self.proc = proc

    async def observe(self, now: datetime) -> Observed:
        # Local statvfs and procfs reads answer in microseconds, so they run inline.
        # If the root filesystem itself hangs, the loop stalls and the watchdog stops
        # pinging: systemd then restarts us, which is the right outcome on a wedged host.
        notes, problems = [], []
        disk: float | None = None
        for path in self.paths:
            try:
                free = _free_fraction(path)
            except OSError as exc:
                problems.append(f"statvfs {path}: {exc.strerror or exc}")
                continue
            notes.append(f"{path} {free:.0%} free")
            disk = free if disk is None else min(disk, free)
        memory = self._read(self.proc / "meminfo", parse_meminfo, problems)
        # /proc/pressure exists only with CONFIG_PSI; its absence is not a problem.
        pressure_file = self.proc / "pressure" / "memory"
        pressure = (self._read(pressure_file, parse_pressure, problems)
                    if pressure_file.exists() else None)
        health = HostHealth(disk_free_fraction=disk, memory_available_fraction=memory,
                            memory_pressure_some_avg10=pressure)
        return Observed({"health": health},
                        SourceStatus(ok=not problems, detail="; ".join(problems or notes)))

    @staticmethod
    def _read(path: Path, parse: Callable[[str], T | None],
                 problems: list[str]) -> T | None:
        try:
            value = parse(path.read_text(encoding="ascii", errors="replace"))
        except (OSError, ValueError) as exc:
            problems.append(f"{path}: {exc}")
            return None
        if value is None:
            problems.append(f"{path}: unexpected format")
        return value


# ---------------------------------------------------------------- the API server, from outside


def _liveness_tls() -> ssl.SSLContext:
    """TLS that checks nothing: the probe asks "does an HTTP server answer at this address?".

    The agent probes before (and without) any cluster credentials, often with a cluster
    CA it does not have, and it sends nothing secret and believes nothing in the reply
    beyond "something answered". An impostor could at worst make a dead API server look
    alive along this one path, which is why the detector wants several independent paths
    and why voters re-observe on their own. Authenticated reads go through the
    Kubernetes client with full verification.
    """
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def _describe(exc: BaseException, timeout: float) -> str:
    if isinstance(exc, TimeoutError):
        return f"timed out after {timeout:g}s"
    if isinstance(exc, ssl.SSLError):
        return f"TLS: {exc.reason or exc}"
    if isinstance(exc, socket.gaierror):
        return exc.strerror or str(exc)
    if isinstance(exc, OSError) and exc.errno:
        return os.strerror(exc.errno)  # asyncio's own text ("Connect call failed …") says less
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


async def tcp_connect(host: str, port: int, within: float) -> str | None:
    """Connect and close: None if it connected, else why not (refused, timed out…)."""
    try:
        async with asyncio.timeout(within):
            _, writer = await asyncio.open_connection(host, port)
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
    except (OSError, TimeoutError) as exc:
        return _describe(exc, within)
    return None


def authority(host: str, port: int) -> str:
    """``host:port``, with an IPv6 address in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _address(url: str) -> tuple[str, int, bool]:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"expected an http(s) URL, got {url!r}")
    secure = parts.scheme == "https"
    return parts.hostname, parts.port or (443 if secure else 80), secure


async def _http_get(url: str, *, within: float, tls: ssl.SSLContext,
                    path: str | None = None, limit: int = 4096) -> tuple[bytes, bytes]:
    """``GET`` ``path`` (default: the URL's) on ``url``'s server: its status line and
    the first ``limit`` bytes of its body; raises OSError, TimeoutError, ValueError."""
    host, port, secure = _address(url)
    request = (f"GET {path or urlsplit(url).path or '/'} HTTP/1.1\r\n"
               f"Host: {authority(host, port)}\r\nUser-Agent: zeta-agent\r\n"
               "Connection: close\r\n\r\n").encode()
    async with asyncio.timeout(within):
        reader, writer = await asyncio.open_connection(host, port, ssl=tls if secure else None)
        try:
            writer.write(request)
            await writer.drain()
            status = await reader.readline()
            body = b""
            if limit and status.startswith(b"HTTP/"):
                try:
                    await reader.readuntil(b"\r\n\r\n")
                    body = await reader.read(limit)
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                    pass  # headers cut short or endless: no body to judge
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
    return status, body


class ApiserverObserver:
    """Probes every API server URL along two paths: a TCP connect and ``GET /readyz``.

    Any HTTP response to /readyz (200, 401, 403, 500) counts as reachable: the
    process answered. Each probe is one ``ApiProbe``, the evidence the
    apiserver-unreachable detector counts paths from. ``clients`` add the paths of
    observers that talk to the API server themselves: only one observer may own the
    domain, so their evidence comes through this one.
    """

    name = "apiserver"
    provides: frozenset[Domain] = frozenset({"apiserver"})

    def __init__(self, urls: Sequence[str], *, timeout: float = 2.0,
                 clients: Sequence[ProbeSource] = ()) -> None:
        self.urls = tuple(urls)
        self.timeout = timeout
        self.clients = tuple(clients)
        self._tls = _liveness_tls()

    async def observe(self, now: datetime) -> Observed:
        network, clients = await asyncio.gather(
            asyncio.gather(*(probe for url in self.urls
                             for probe in (self._tcp(url), self._readyz(url)))),
            asyncio.gather(*(client.probes() for client in self.clients)))
        probes = [*network, *(probe for paths in clients for probe in paths)]
        reachable = sum(p.ok for p in probes)
        return Observed({"apiserver": tuple(probes)}, SourceStatus(
            ok=True, detail=f"{reachable} of {len(probes)} paths reachable"))

    async def _tcp(self, url: str) -> ApiProbe:
        try:
            host, port, _ = _address(url)
        except ValueError as exc:
            return ApiProbe(path=f"tcp {url}", ok=False, error=str(exc))
        error = await tcp_connect(host, port, self.timeout)
        return ApiProbe(path=f"tcp {authority(host, port)}", ok=error is None, error=error or "")

    async def _readyz(self, url: str) -> ApiProbe:
        path = f"readyz {url}"
        try:
            status, _ = await _http_get(url, within=self.timeout, tls=self._tls,
                                        path=f"{urlsplit(url).path.rstrip('/')}/readyz", limit=0)
        except ValueError as exc:
            return ApiProbe(path=path, ok=False, error=str(exc))
        except (OSError, TimeoutError) as exc:  # ssl.SSLError is an OSError
            return ApiProbe(path=path, ok=False, error=_describe(exc, self.timeout))
        if not status.startswith(b"HTTP/"):
            return ApiProbe(path=path, ok=False,
                            error=f"no HTTP response: {status[:40]!r}" if status else
                            "connection closed without a response")
        return ApiProbe(path=path, ok=True)


# ---------------------------------------------------------------- this node's own kubelet


def healthz_answer(status: bytes, body: bytes) -> str:
    """``ok`` for a 200 whose body is ``ok``, else what was answered."""
    code = status.split(b" ")[1].decode("ascii", "replace") if status.count(b" ") else ""
    text = body.decode("utf-8", "replace").strip()[:80]
    if code == "200" and text == HEALTHY:
        return HEALTHY
    if not status:
        return "connection closed without a response"
    return f"HTTP {code}: {text}" if code else f"no HTTP response: {status[:40]!r}"


class KubeletObserver:
    """This host's own kubelet, as its heartbeat reports it to voters on other hosts
    (the ``host`` evidence path): the state of the kubelet and container runtime units,
    and the kubelet's healthz on its loopback port.

    A host that runs no kubelet (no unit loaded, healthz refused) reports nothing,
    unless ``$ZETA_NODE_NAME`` says which node it is (``explicit``).
    """

    name = "kubelet"
    provides: frozenset[Domain] = frozenset({"node_report"})

    def __init__(self, node: str, settings: HostEvidence, *, explicit: bool,
                 systemctl: Systemctl | None = None) -> None:
        self.node = node
        self.settings = settings
        self.explicit = explicit
        self.systemctl = systemctl or Systemctl()
        self._tls = _liveness_tls()

    async def observe(self, now: datetime) -> Observed:
        within = self.settings.probeTimeout.total_seconds()
        units, healthz = await asyncio.gather(self._units(within), self._healthz(within))
        states, problem = units
        loaded = any(state != "not-found" for state in states.values())
        if not (self.explicit or loaded or healthz == HEALTHY):
            return Observed({}, SourceStatus(ok=True, detail="no kubelet on this host"))
        report = NodeReport(node=self.node, observed_at=now, units=states, healthz=healthz)
        detail = ", ".join([*(f"{u} {s}" for u, s in states.items()), f"healthz {healthz}"])
        return Observed({"node_report": report},
                        SourceStatus(ok=problem is None, detail=problem or detail))

    async def _units(self, within: float) -> tuple[dict[str, str], str | None]:
        try:
            shown = await self.systemctl.show_units(self.settings.units, within=within)
        except SystemctlError as exc:
            return {}, f"units not read: {exc}"
        return {u.name: ("not-found" if u.load_state == "not-found"
                         else f"{u.active_state}/{u.sub_state}") for u in shown}, None

    async def _healthz(self, within: float) -> str:
        try:
            status, body = await _http_get(self.settings.kubeletHealthz, within=within,
                                           tls=self._tls, limit=256)
        except (OSError, TimeoutError, ValueError) as exc:
            return _describe(exc, within)
        return healthz_answer(status, body)


def host_observers(policies: Iterable[RepairPolicy], fleet: Fleet, state_dir: Path, *,
                   node: str, explicit_node: bool,
                   clients: Sequence[ProbeSource] = ()) -> list[Observer]:
    """What an agent can see from its own host, before any bus or Kubernetes observer.

    ``node`` is the Kubernetes node this host would run (``explicit_node``: the operator
    said so). ``clients`` (the Kubernetes observer) add their own paths to the API
    server probes.
    """
    observers: list[Observer] = [
        HealthObserver(state_dir),
        KubeletObserver(node, fleet.spec.safety.hostEvidence, explicit=explicit_node)]
    if units := watched_units(policies):
        observers.append(UnitObserver(units))
    if fleet.spec.apiservers or clients:
        observers.append(ApiserverObserver(fleet.spec.apiservers, clients=clients))
    return observers
