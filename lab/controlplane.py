"""Run a real Kubernetes control plane on 127.0.0.1: etcd, kube-apiserver, kube-controller-manager.

For the tests and the lab. Everything lives under one work directory: the PKI
(``pki/``, made with the ``openssl`` CLI), etcd's data, the token file, one log per
process (``logs/``) and a self-contained kubeconfig per user (``kubeconfigs/``).

Authentication: static tokens (``--token-auth-file``) for the users named at
construction, since a token file is read once at start; anyone else asked of
``kubeconfig_for`` gets a client certificate signed by the cluster CA. Authorization
is RBAC only, so a user without bindings gets 403. ``zeta-admin`` is in
``system:masters``.

The controller manager runs the controllers whose behaviour the agents meet
(service accounts and their tokens, Deployments, ReplicaSets, DaemonSets,
PodDisruptionBudgets, garbage collection, namespace deletion, the aggregated
ClusterRoles ``admin``/``edit``/``view``, and node lifecycle,
which marks a node whose kubelet stopped renewing its Lease ``Ready=Unknown``
after ``node_monitor_grace``). It does not run taint-based eviction: pods on a dead
node stay until someone drains it, which is what the agents are for.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import shutil
import ssl
import subprocess
import time
import urllib.error
import urllib.request
import urllib.response
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import structlog

from lab.building import Binaries, ensure_binaries
from lab.natsserver import free_ports

log = structlog.get_logger(__name__)

ADMIN = "zeta-admin"
CONTROLLER_MANAGER_USER = "system:kube-controller-manager"
"""The bootstrap RBAC policy binds the controller manager's role to this user name."""
SERVICE_CIDR = "10.96.0.0/16"
SERVICE_IP = "10.96.0.1"  # the first address: the in-cluster ``kubernetes`` Service
CONTROLLERS = (
    "serviceaccount-controller", "serviceaccount-token-controller", "disruption-controller",
    "deployment-controller", "replicaset-controller", "daemonset-controller",
    "garbage-collector-controller", "namespace-controller", "node-lifecycle-controller",
    # Fills the aggregated ClusterRoles (admin, edit, view): without it they grant nothing.
    "clusterrole-aggregation-controller",
)
START_TIMEOUT = 60.0
STOP_GRACE = 10.0
LOG_TAIL = 15


class ControlPlaneError(RuntimeError):
    """A process would not start or become ready; the message carries its last log lines."""


@dataclass
class _Process:
    """One control-plane program: its arguments, its log file, its process while running."""

    name: str
    argv: list[str]
    log_file: Path
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def start(self) -> None:
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        with self.log_file.open("ab") as out:  # the child keeps its own descriptor
            out.write(f"--- {time.strftime('%H:%M:%S')} starting {self.name}\n".encode())
            out.flush()
            self.proc = subprocess.Popen(self.argv, stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, grace: float = STOP_GRACE) -> None:
        """SIGTERM, then SIGKILL after ``grace`` seconds; always reaped."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc.wait()
        self.proc = None

    def tail(self, lines: int = LOG_TAIL) -> str:
        try:
            text = self.log_file.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def failed(self, why: str) -> ControlPlaneError:
        code = "" if self.proc is None or self.proc.poll() is None else \
            f" (exit {self.proc.returncode})"
        return ControlPlaneError(f"{self.name} {why}{code}; last lines of {self.log_file}:\n"
                                 f"{self.tail()}")


class ControlPlane:
    """etcd + kube-apiserver + kube-controller-manager on loopback, free ports, one work dir.

    ``users`` are the token users: names (no groups) or a mapping of name to groups.
    Use as a context manager, or ``start()`` then ``stop()``.
    """

    def __init__(self, workdir: Path, users: Iterable[str] | Mapping[str, Sequence[str]] = (),
                 *, node_monitor_grace: float = 6.0, binaries: Binaries | None = None) -> None:
        self.workdir = workdir
        groups = users if isinstance(users, Mapping) else {name: () for name in users}
        self._users: dict[str, tuple[str, ...]] = {
            name: tuple(g) for name, g in groups.items()}
        self._users[ADMIN] = ("system:masters",)
        self.node_monitor_grace = node_monitor_grace
        self._binaries = binaries
        self._tokens: dict[str, str] = {}
        etcd_port, peer_port, api_port = free_ports(3)
        self.etcd_url = f"http://127.0.0.1:{etcd_port}"
        self._peer_url = f"http://127.0.0.1:{peer_port}"
        self.url = f"https://127.0.0.1:{api_port}"
        self.port = api_port
        self.pki = workdir / "pki"
        self.ca_file = self.pki / "ca.crt"
        self._kubeconfigs = workdir / "kubeconfigs"
        self.admin_kubeconfig = self._kubeconfigs / f"{ADMIN}.kubeconfig"
        self._etcd: _Process | None = None
        self._apiserver: _Process | None = None
        self._controller_manager: _Process | None = None

    # ------------------------------------------------------------ lifecycle

    def start(self, timeout: float = START_TIMEOUT) -> ControlPlane:
        """Start the three processes and wait until the API server is ready and the
        controller manager is working (the ``default`` ServiceAccount exists)."""
        started = time.monotonic()
        commands = self.commands(self._binaries or ensure_binaries())
        self._etcd = self._process("etcd", commands["etcd"])
        self._apiserver = self._process("kube-apiserver", commands["kube-apiserver"])
        self._controller_manager = self._process(
            "kube-controller-manager", commands["kube-controller-manager"])
        deadline = started + timeout
        try:
            self._etcd.start()
            self._wait(self._etcd, deadline, self._etcd_healthy, "did not become healthy")
            self._apiserver.start()
            self._wait(self._apiserver, deadline, self.ready, "did not become ready (/readyz)")
            self._controller_manager.start()
            self._wait(self._controller_manager, deadline, self._controllers_working,
                       "did not create the default ServiceAccount")
        except BaseException:
            self.stop()
            raise
        log.info("control plane started", url=self.url, workdir=str(self.workdir),
                 seconds=round(time.monotonic() - started, 1))
        return self

    def stop(self) -> None:
        """Stop everything (controller manager, API server, etcd; each SIGTERM then SIGKILL)."""
        for process in (self._controller_manager, self._apiserver, self._etcd):
            if process is not None:
                process.stop()

    def stop_apiserver(self, grace: float = STOP_GRACE) -> None:
        """Stop only the API server (an outage): etcd and the controller manager keep running.

        On SIGTERM it refuses new connections at once but keeps open watches going while
        it drains (the controller manager's keep it from exiting), so it is killed after
        ``grace`` seconds: what clients see in between is a real stopping API server.
        Pass a small ``grace`` for an abrupt outage.
        """
        if self._apiserver is not None:
            self._apiserver.stop(grace)

    def start_apiserver(self, timeout: float = START_TIMEOUT) -> None:
        """Start the API server again on the same port with the same data; wait until ready."""
        if self._apiserver is None:
            raise ControlPlaneError("start_apiserver: the control plane was never started")
        if self._apiserver.running:
            return
        self._apiserver.start()
        self._wait(self._apiserver, time.monotonic() + timeout, self.ready,
                   "did not become ready (/readyz) after a restart")

    @property
    def pids(self) -> dict[str, int]:
        """Process ids of the running programs, by name (for outage drills and checks)."""
        processes = (self._etcd, self._apiserver, self._controller_manager)
        return {p.name: p.proc.pid for p in processes
                if p is not None and p.proc is not None and p.running}

    def __enter__(self) -> ControlPlane:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    # ------------------------------------------------------------ identities

    @property
    def users(self) -> list[str]:
        """The token users (including the admin)."""
        return sorted(self._users)

    def token(self, user: str) -> str:
        """The static bearer token of a token user (KeyError if not one)."""
        return self._tokens[user]

    def kubeconfig_for(self, user: str, groups: Sequence[str] = ()) -> Path:
        """A self-contained kubeconfig (CA and credentials embedded) for ``user``.

        A token user asked for without ``groups`` gets its token (and the groups it was
        declared with). Anyone else, or any user with explicit ``groups``, gets a client
        certificate (CN=user, O=each group) signed by the cluster CA.
        """
        if not self._tokens:
            raise ControlPlaneError("kubeconfig_for: start the control plane first")
        if user in self._users and not groups:
            return self._kubeconfigs / f"{user}.kubeconfig"
        name = "+".join([user, *groups]).replace(":", "_").replace("/", "_")
        path = self._kubeconfigs / f"{name}.cert.kubeconfig"
        if not path.exists():
            key, cert = self._issue(f"client-{name}", user, groups)
            self._write_kubeconfig(path, user, {
                "client-certificate-data": _b64(cert.read_bytes()),
                "client-key-data": _b64(key.read_bytes())})
        return path

    # ------------------------------------------------------------ readiness

    def ready(self) -> bool:
        """Whether the API server answers ``/readyz`` with 200."""
        try:
            with self._get("/readyz", timeout=2.0) as response:
                return bool(response.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def _get(self, path: str, timeout: float) -> urllib.response.addinfourl:
        request = urllib.request.Request(  # noqa: S310 - https to our own loopback server
            self.url + path, headers={"Authorization": f"Bearer {self._tokens[ADMIN]}"})
        context = ssl.create_default_context(cafile=str(self.ca_file))
        response: urllib.response.addinfourl = urllib.request.urlopen(  # noqa: S310
            request, timeout=timeout, context=context)
        return response

    def _etcd_healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.etcd_url + "/health", timeout=2.0) as response:  # noqa: S310
                return bool(json.loads(response.read()).get("health") == "true")
        except (urllib.error.URLError, OSError, ValueError):
            return False

    def _controllers_working(self) -> bool:
        try:
            with self._get("/api/v1/namespaces/default/serviceaccounts/default", timeout=2.0):
                return True
        except (urllib.error.URLError, OSError):
            return False

    @staticmethod
    def _wait(process: _Process, deadline: float, check: Callable[[], bool], why: str) -> None:
        while not check():
            if not process.running:
                raise process.failed("exited during start-up")
            if time.monotonic() > deadline:
                raise process.failed(why)
            time.sleep(0.2)

    # ------------------------------------------------------------ files

    def _process(self, name: str, argv: list[str]) -> _Process:
        return _Process(name, argv, self.workdir / "logs" / f"{name}.log")

    def commands(self, binaries: Binaries) -> dict[str, list[str]]:
        """Write the PKI, token file and kubeconfigs, and return each program's argv.

        For running the control plane under another supervisor (systemd in a test
        container) with exactly the files and flags ``start()`` would use.
        """
        self._prepare()
        return {"etcd": self._etcd_args(binaries.etcd),
                "kube-apiserver": self._apiserver_args(binaries.apiserver),
                "kube-controller-manager":
                    self._controller_manager_args(binaries.controller_manager)}

    def _prepare(self) -> None:
        """PKI, tokens and kubeconfigs: made once per work directory, reused on a restart."""
        self.pki.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._kubeconfigs.mkdir(parents=True, exist_ok=True, mode=0o700)
        if not self.ca_file.exists():
            _openssl("req", "-x509", *_NEW_KEY, "-keyout", str(self.pki / "ca.key"),
                     "-out", str(self.ca_file), "-subj", "/CN=zeta-test-ca",
                     "-addext", "basicConstraints=critical,CA:TRUE",
                     "-addext", "keyUsage=critical,keyCertSign,cRLSign")
        if not (self.pki / "apiserver.crt").exists():
            names = ("localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc")
            san = ",".join(["IP:127.0.0.1", f"IP:{SERVICE_IP}", *(f"DNS:{n}" for n in names)])
            self._issue("apiserver", "kube-apiserver", (), server_names=san)
        if not (self.pki / "sa.key").exists():
            _openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256",
                     "-out", str(self.pki / "sa.key"))
            _openssl("pkey", "-in", str(self.pki / "sa.key"), "-pubout",
                     "-out", str(self.pki / "sa.pub"))
        tokens_file = self.pki / "tokens.csv"
        every = {**self._users, CONTROLLER_MANAGER_USER: ()}
        if tokens_file.exists():
            self._tokens = {row.split(",")[1]: row.split(",")[0]
                            for row in tokens_file.read_text(encoding="utf-8").splitlines()}
        else:
            self._tokens = {user: secrets.token_hex(24) for user in every}
            rows = [f'{self._tokens[u]},{u},{u},"{",".join(g)}"' for u, g in every.items()]
            tokens_file.write_text("\n".join(rows) + "\n", encoding="utf-8")
            tokens_file.chmod(0o600)
        for user in every:
            self._write_kubeconfig(self._kubeconfigs / f"{user}.kubeconfig", user,
                                   {"token": self._tokens[user]})

    def _issue(self, stem: str, common_name: str, groups: Sequence[str], *,
               server_names: str | None = None) -> tuple[Path, Path]:
        """A key and a certificate signed by the cluster CA: a server's if ``server_names``."""
        key, cert = self.pki / f"{stem}.key", self.pki / f"{stem}.crt"
        subject = "/CN=" + common_name + "".join(f"/O={g}" for g in groups)
        usage = (["-addext", f"subjectAltName={server_names}",
                  "-addext", "extendedKeyUsage=serverAuth"] if server_names
                 else ["-addext", "extendedKeyUsage=clientAuth"])
        _openssl("req", "-x509", *_NEW_KEY, "-keyout", str(key), "-out", str(cert),
                 "-subj", subject, "-CA", str(self.ca_file), "-CAkey", str(self.pki / "ca.key"),
                 "-addext", "basicConstraints=critical,CA:FALSE", *usage)
        return key, cert

    def _write_kubeconfig(self, path: Path, user: str, credentials: Mapping[str, str]) -> None:
        config = {
            "apiVersion": "v1", "kind": "Config", "current-context": user,
            "clusters": [{"name": "zeta-test", "cluster": {
                "server": self.url,
                "certificate-authority-data": _b64(self.ca_file.read_bytes())}}],
            "users": [{"name": user, "user": dict(credentials)}],
            "contexts": [{"name": user, "context": {"cluster": "zeta-test", "user": user}}],
        }
        # JSON is YAML: every kubeconfig reader accepts it, and no YAML writer is needed.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            json.dump(config, out, indent=2)

    # ------------------------------------------------------------ arguments

    def _etcd_args(self, etcd: Path) -> list[str]:
        return [str(etcd), "--name", "zeta", "--data-dir", str(self.workdir / "etcd"),
                "--listen-client-urls", self.etcd_url, "--advertise-client-urls", self.etcd_url,
                "--listen-peer-urls", self._peer_url,
                "--initial-advertise-peer-urls", self._peer_url,
                "--initial-cluster", f"zeta={self._peer_url}",
                # A test cluster need not survive power loss; fsync dominates its latency.
                "--unsafe-no-fsync",
                # Above the 2 GiB default, which a benchmark's 150,000 pods and their
                # revisions between compactions could fill: etcd then refuses every write.
                "--quota-backend-bytes=8589934592", "--log-level", "warn"]

    def _apiserver_args(self, apiserver: Path) -> list[str]:
        pki = self.pki
        return [str(apiserver),
                "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1",
                f"--secure-port={self.port}",
                f"--etcd-servers={self.etcd_url}",
                f"--tls-cert-file={pki / 'apiserver.crt'}",
                f"--tls-private-key-file={pki / 'apiserver.key'}",
                f"--client-ca-file={self.ca_file}",
                f"--token-auth-file={pki / 'tokens.csv'}",
                "--authorization-mode=RBAC",
                "--service-account-issuer=https://kubernetes.default.svc",
                f"--service-account-key-file={pki / 'sa.pub'}",
                f"--service-account-signing-key-file={pki / 'sa.key'}",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                # The endpoint of the ``kubernetes`` Service would be 127.0.0.1, which
                # Endpoints validation rejects: nothing in-cluster needs it here.
                "--endpoint-reconciler-type=none",
                "--profiling=false"]

    def _controller_manager_args(self, controller_manager: Path) -> list[str]:
        grace = f"{self.node_monitor_grace:g}s"
        return [str(controller_manager),
                f"--kubeconfig={self._kubeconfigs / (CONTROLLER_MANAGER_USER + '.kubeconfig')}",
                f"--controllers={','.join(CONTROLLERS)}",
                "--use-service-account-credentials",
                f"--service-account-private-key-file={self.pki / 'sa.key'}",
                f"--root-ca-file={self.ca_file}",
                "--leader-elect=false",
                "--secure-port=0",  # no metrics endpoint: one fewer port to collide on
                f"--node-monitor-grace-period={grace}", "--node-monitor-period=1s",
                # The default (20/s) would make the controllers the bottleneck of a
                # benchmark with thousands of nodes.
                "--kube-api-qps=200", "--kube-api-burst=400"]


_NEW_KEY = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-days", "3650")


def _openssl(*args: str) -> None:
    openssl = shutil.which("openssl")
    if openssl is None:
        raise ControlPlaneError("`openssl` is not on PATH: it makes the test cluster's PKI")
    done = subprocess.run([openssl, *args], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise ControlPlaneError(f"openssl {args[0]} failed: {done.stderr.strip()}")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")
