"""Build the pinned Kubernetes control plane (kube-apiserver, kube-controller-manager, etcd).

The binaries come from the Go module proxy, not from a distribution: Debian's
etcd-server (3.4) is too old for this API server, and there is no Debian package of
kube-apiserver. A small module is generated in the cache directory: it requires
``k8s.io/kubernetes`` at ``KUBERNETES_VERSION`` and replaces every staging module
(``k8s.io/api``, ``k8s.io/client-go``, …, which k8s.io/kubernetes requires at
``v0.0.0`` and replaces with ``./staging/…`` paths the proxy cannot serve) with the
matching ``v0.x`` release. etcd is the server version that release's go.mod requires
(``ETCD_VERSION``), built from the same module graph, so the two always agree.

The result is cached per machine in ``${ZETA_CACHE_DIR:-~/.cache/zeta-agent}/k8s/<version>/``
and reused; a lock makes parallel pytest workers and the lab build it once. A cold
build takes several minutes (about 8 on two cores); progress lines say so.

``python -m lab.building`` builds if needed and prints the paths.
"""

from __future__ import annotations

import argparse
import functools
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from lab.tools import (
    Progress,
    ToolUnavailableError,
    build_lock,
    cache_dir,
    find_go,
    stderr_progress,
)

KUBERNETES_VERSION = "v1.37.2"
STAGING_VERSION = "v0.37.2"
ETCD_VERSION = "v3.7.0"
"""Checked, not chosen: the etcd server that k8s.io/kubernetes ``KUBERNETES_VERSION`` requires."""

STAGING_MODULES = (
    "api", "apiextensions-apiserver", "apimachinery", "apiserver", "cli-runtime", "client-go",
    "cloud-provider", "cluster-bootstrap", "code-generator", "component-base",
    "component-helpers", "controller-manager", "cri-api", "cri-client", "cri-streaming",
    "csi-translation-lib", "dynamic-resource-allocation", "endpointslice", "externaljwt", "kms",
    "kube-aggregator", "kube-controller-manager", "kube-proxy", "kube-scheduler", "kubectl",
    "kubelet", "metrics", "mount-utils", "pod-security-admission", "sample-apiserver",
    "sample-cli-plugin", "sample-controller", "streaming",
)
"""The ``k8s.io/*`` staging modules of KUBERNETES_VERSION's go.mod (its ``replace`` block)."""

APISERVER_PACKAGE = "k8s.io/kubernetes/cmd/kube-apiserver"
CONTROLLER_MANAGER_PACKAGE = "k8s.io/kubernetes/cmd/kube-controller-manager"
ETCD_PACKAGE = "go.etcd.io/etcd/server/v3"
ETCD_MODULE = "go.etcd.io/etcd/server/v3"
BINARIES = ("kube-apiserver", "kube-controller-manager", "etcd")

BUILD_TIMEOUT = 60 * 60.0
"""Generous: a cold build is ~8 min on two cores, more on a slow disk or network."""
PROGRESS_EVERY = 60.0


@dataclass(frozen=True)
class Binaries:
    """Paths of the three control-plane programs."""

    apiserver: Path
    controller_manager: Path
    etcd: Path


def k8s_cache(environ: Mapping[str, str] = os.environ) -> Path:
    """Where this version's binaries live: one directory per version, never overwritten."""
    return cache_dir(environ) / "k8s" / KUBERNETES_VERSION


def binaries_in(directory: Path) -> Binaries:
    """The binaries' paths in ``directory`` (they may not exist yet)."""
    return Binaries(directory / "kube-apiserver", directory / "kube-controller-manager",
                    directory / "etcd")


def go_mod() -> str:
    """The build module's go.mod: kubernetes pinned, every staging module replaced to match.

    No ``go`` line: ``go mod tidy`` writes the one the dependencies need.
    """
    replaces = "\n".join(f"\tk8s.io/{m} => k8s.io/{m} {STAGING_VERSION}" for m in STAGING_MODULES)
    return (f"module zeta.local/k8s-build\n\nrequire k8s.io/kubernetes {KUBERNETES_VERSION}\n\n"
            f"replace (\n{replaces}\n)\n")


def tools_go() -> str:
    """Blank imports of the programs, so ``go mod tidy`` keeps exactly their dependencies."""
    imports = "\n".join(f'\t_ "{p}"' for p in
                        (APISERVER_PACKAGE, CONTROLLER_MANAGER_PACKAGE, ETCD_PACKAGE))
    return f"//go:build tools\n\npackage tools\n\nimport (\n{imports}\n)\n"


def version_ldflags() -> str:
    """Linker flags that stamp the release into the binaries (else /version says v0.0.0-master)."""
    major, minor, _ = KUBERNETES_VERSION.removeprefix("v").split(".")
    stamps = {"gitVersion": KUBERNETES_VERSION, "gitMajor": major, "gitMinor": minor,
              "gitTreeState": "clean"}
    flags = [f"-X {pkg}.{name}={value}"
             for pkg in ("k8s.io/component-base/version", "k8s.io/client-go/pkg/version")
             for name, value in stamps.items()]
    return " ".join(["-s", "-w", *flags])  # -s -w: no symbol tables, a third smaller


def ensure_binaries(environ: Mapping[str, str] = os.environ,
                    progress: Progress = stderr_progress) -> Binaries:
    """The pinned control-plane binaries, built into the cache on first use.

    Raises ToolUnavailableError if ``go`` is missing or the build fails (the message
    names the log file with the full output).
    """
    directory = k8s_cache(environ)
    found = binaries_in(directory)
    if _complete(found):
        return found
    with build_lock(directory / ".lock", progress):
        if not _complete(found):  # else built by whoever held the lock before us
            _build(directory, environ, progress)
    return found


def _complete(binaries: Binaries) -> bool:
    return all(p.exists() for p in (binaries.apiserver, binaries.controller_manager,
                                    binaries.etcd))


def _build(directory: Path, environ: Mapping[str, str], progress: Progress) -> None:
    go = find_go(environ, f"kube-apiserver {KUBERNETES_VERSION} into {directory}")
    source = directory / "src"
    source.mkdir(parents=True, exist_ok=True)
    (source / "go.mod").write_text(go_mod(), encoding="utf-8")
    # Written afresh by tidy and checked against the checksum database, never reused.
    (source / "go.sum").unlink(missing_ok=True)
    (source / "tools.go").write_text(tools_go(), encoding="utf-8")
    log = directory / "build.log"
    env = {**environ, "GOFLAGS": "-mod=mod",
           # Static binaries, as Kubernetes releases them: no C toolchain needed.
           "CGO_ENABLED": "0"}
    progress(f"building kube-apiserver {KUBERNETES_VERSION}, kube-controller-manager and etcd "
             f"{ETCD_VERSION} from the Go module proxy into {directory} (first time only, "
             f"several minutes; output in {log})…")
    started = time.monotonic()
    with log.open("w", encoding="utf-8") as out, \
            tempfile.TemporaryDirectory(dir=directory, prefix=".build-") as scratch:
        run = functools.partial(_run, cwd=source, env=env, out=out, log=log,
                                progress=progress, started=started)
        run([go, "mod", "tidy"])
        _check_etcd_version(go, source, env)
        run([go, "build", "-trimpath", "-ldflags", version_ldflags(), "-o", scratch + "/",
             APISERVER_PACKAGE, CONTROLLER_MANAGER_PACKAGE])
        run([go, "build", "-trimpath", "-ldflags", "-s -w", "-o", f"{scratch}/etcd",
             ETCD_PACKAGE])
        # Moved into place only when all are complete, so a killed build never leaves a
        # half-written binary that later runs would trust; etcd last, since its presence
        # is part of what "complete" means.
        for name in BINARIES:
            (Path(scratch) / name).replace(directory / name)
    progress(f"built the control plane in {_minutes(time.monotonic() - started)}: {directory}")


def _run(cmd: Sequence[str], *, cwd: Path, env: Mapping[str, str], out: TextIO, log: Path,
         progress: Progress, started: float) -> None:
    out.write(f"$ {' '.join(cmd)}\n")
    out.flush()
    try:
        proc = subprocess.Popen(cmd, cwd=cwd, env=dict(env), stdout=out,
                                stderr=subprocess.STDOUT)
    except OSError as exc:
        raise ToolUnavailableError(f"{' '.join(cmd[:3])}: {exc}") from exc
    while True:
        try:
            code = proc.wait(timeout=PROGRESS_EVERY)
            break
        except subprocess.TimeoutExpired:
            elapsed = time.monotonic() - started
            if elapsed > BUILD_TIMEOUT:
                proc.kill()
                proc.wait()
                raise ToolUnavailableError(
                    f"building the control plane took over {_minutes(BUILD_TIMEOUT)}; "
                    f"see {log}") from None
            progress(f"still building… {_minutes(elapsed)}")
    if code != 0:
        out.flush()
        tail = log.read_text(encoding="utf-8", errors="replace").splitlines()[-8:]
        raise ToolUnavailableError(f"{' '.join(cmd[:3])} failed (exit {code}; full output in "
                                   f"{log}): " + " | ".join(tail))



def _check_etcd_version(go: str, source: Path, env: Mapping[str, str]) -> None:
    """Fail if the module graph chose another etcd than the one this module says it builds."""
    chosen = subprocess.run([go, "list", "-m", "-f", "{{.Version}}", ETCD_MODULE], cwd=source,
                            env=dict(env), capture_output=True, text=True, check=False)
    if chosen.returncode != 0 or chosen.stdout.strip() != ETCD_VERSION:
        raise ToolUnavailableError(
            f"k8s.io/kubernetes {KUBERNETES_VERSION} resolves {ETCD_MODULE} to "
            f"{chosen.stdout.strip() or chosen.stderr.strip()!r}, not the pinned {ETCD_VERSION}")


def _minutes(seconds: float) -> str:
    return f"{int(seconds // 60)}m" if seconds >= 60 else f"{seconds:.0f}s"


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m lab.building``: build if needed, print the three paths."""
    parser = argparse.ArgumentParser(prog="python -m lab.building",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.parse_args(argv)
    try:
        found = ensure_binaries()
    except ToolUnavailableError as exc:
        stderr_progress(f"error: {exc}")
        return 2
    for path in (found.apiserver, found.controller_manager, found.etcd):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
