"""The test cluster itself: the pinned build, the control plane's processes, its security.

Unit tests drive building.py with a stand-in ``go`` (what it runs, in what order,
what it refuses); the rest run against the real control plane of the session.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import stat
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import urllib3
from kubernetes.client.exceptions import ApiException

from lab import building
from lab.building import (
    KUBERNETES_VERSION,
    STAGING_MODULES,
    STAGING_VERSION,
    Binaries,
    ensure_binaries,
    go_mod,
    tools_go,
    version_ldflags,
)
from lab.controlplane import ControlPlane, ControlPlaneError
from lab.nodesim import JsonApi, NodeSimulator
from lab.tools import ToolUnavailableError
from tests.k8s import NOBODY, PERSONA_USERS, admin_json, deployment, wait_for

pytestmark = pytest.mark.slow

# ---------------------------------------------------------------- building (no Go needed)

FAKE_GO = """#!/bin/sh
# Stands in for `go`: records each call, and "builds" by creating the -o outputs.
echo "$*" >> "{calls}"
case "$1" in
  list) echo "{etcd}" ;;
  build)
    out=""; prev=""
    for arg in "$@"; do [ "$prev" = "-o" ] && out="$arg"; prev="$arg"; done
    case "$out" in
      */) touch "${{out}}kube-apiserver" "${{out}}kube-controller-manager" ;;
      *) touch "$out" ;;
    esac ;;
esac
"""


def _fake_go(tmp_path: Path, etcd_version: str = building.ETCD_VERSION) -> dict[str, str]:
    bin_dir = tmp_path / "fakebin"
    bin_dir.mkdir()
    go = bin_dir / "go"
    go.write_text(FAKE_GO.format(calls=tmp_path / "calls", etcd=etcd_version))
    go.chmod(go.stat().st_mode | stat.S_IXUSR)
    return {"PATH": f"{bin_dir}:/usr/bin:/bin", "ZETA_CACHE_DIR": str(tmp_path / "cache"),
            "HOME": str(tmp_path)}


def test_go_mod_replaces_every_staging_module_with_the_matching_release() -> None:
    text = go_mod()
    assert f"require k8s.io/kubernetes {KUBERNETES_VERSION}" in text
    for module in STAGING_MODULES:
        assert f"k8s.io/{module} => k8s.io/{module} {STAGING_VERSION}" in text
    assert STAGING_VERSION.removeprefix("v0.") == KUBERNETES_VERSION.removeprefix("v1.")


def test_tools_go_imports_the_three_programs() -> None:
    text = tools_go()
    for package in (building.APISERVER_PACKAGE, building.CONTROLLER_MANAGER_PACKAGE,
                    building.ETCD_PACKAGE):
        assert f'_ "{package}"' in text


def test_version_is_stamped_into_both_version_packages() -> None:
    flags = version_ldflags()
    for package in ("k8s.io/component-base/version", "k8s.io/client-go/pkg/version"):
        assert f"-X {package}.gitVersion={KUBERNETES_VERSION}" in flags
        assert f"-X {package}.gitMinor=37" in flags


def test_cached_binaries_are_used_without_go(tmp_path: Path) -> None:
    environ = {"PATH": "", "ZETA_CACHE_DIR": str(tmp_path)}
    directory = building.k8s_cache(environ)
    directory.mkdir(parents=True)
    for name in building.BINARIES:
        (directory / name).touch()
    assert ensure_binaries(environ) == building.binaries_in(directory)


def test_without_go_the_error_says_go_is_needed(tmp_path: Path) -> None:
    with pytest.raises(ToolUnavailableError, match="`go` is not on PATH"):
        ensure_binaries({"PATH": "", "ZETA_CACHE_DIR": str(tmp_path)}, progress=lambda _: None)


def test_build_generates_the_module_builds_with_version_flags_and_says_so(
        tmp_path: Path) -> None:
    environ = _fake_go(tmp_path)
    lines: list[str] = []
    found = ensure_binaries(environ, progress=lines.append)
    directory = building.k8s_cache(environ)
    assert found == building.binaries_in(directory)
    assert all(p.exists() for p in (found.apiserver, found.controller_manager, found.etcd))
    assert (directory / "src" / "go.mod").read_text() == go_mod()
    assert (directory / "src" / "tools.go").read_text() == tools_go()
    calls = (tmp_path / "calls").read_text().splitlines()
    assert calls[0] == "mod tidy"
    assert calls[1].startswith("list -m")
    assert f"gitVersion={KUBERNETES_VERSION}" in calls[2]
    assert calls[2].endswith(f"{building.APISERVER_PACKAGE} {building.CONTROLLER_MANAGER_PACKAGE}")
    assert calls[3].endswith(building.ETCD_PACKAGE)
    assert lines[0].startswith(f"building kube-apiserver {KUBERNETES_VERSION}")
    assert "from the Go module proxy" in lines[0]
    assert "first time only" in lines[0]
    assert lines[-1].startswith("built the control plane in")
    assert not list(directory.glob(".build-*")), "the scratch directory is left behind"


def test_an_unexpected_etcd_version_is_refused(tmp_path: Path) -> None:
    environ = _fake_go(tmp_path, etcd_version="v3.6.9")
    with pytest.raises(ToolUnavailableError, match=r"v3\.6\.9.*not the pinned v3\.7\.0"):
        ensure_binaries(environ, progress=lambda _: None)
    assert not building.k8s_cache(environ).joinpath("etcd").exists()


def test_parallel_callers_build_once(tmp_path: Path) -> None:
    environ = _fake_go(tmp_path)
    results: list[Binaries] = []
    workers = [threading.Thread(target=lambda: results.append(
        ensure_binaries(environ, progress=lambda _: None))) for _ in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert len(results) == 4
    assert len(set(results)) == 1
    tidies = [c for c in (tmp_path / "calls").read_text().splitlines() if c == "mod tidy"]
    assert len(tidies) == 1


# ---------------------------------------------------------------- starting and stopping


def test_a_process_that_dies_at_start_is_reported_with_its_last_lines(tmp_path: Path) -> None:
    dying = tmp_path / "etcd"
    dying.write_text("#!/bin/sh\necho 'etcd: fatal: the data dir is on fire' >&2\nexit 3\n")
    dying.chmod(0o755)
    plane = ControlPlane(tmp_path / "work", binaries=Binaries(dying, dying, dying))
    with pytest.raises(ControlPlaneError) as raised:
        plane.start()
    message = str(raised.value)
    assert "etcd exited during start-up (exit 3)" in message
    assert "the data dir is on fire" in message
    assert str(tmp_path / "work" / "logs" / "etcd.log") in message


def test_start_is_quick_and_stop_ends_every_process(control_plane: ControlPlane,
                                                   tmp_path: Path) -> None:
    binaries = ensure_binaries()
    plane = ControlPlane(tmp_path, binaries=binaries)
    started = time.monotonic()
    with plane:
        elapsed = time.monotonic() - started
        assert plane.ready()
        pids = plane.pids
        assert set(pids) == {"etcd", "kube-apiserver", "kube-controller-manager"}
    assert elapsed < 30, f"the control plane took {elapsed:.1f}s to start"
    assert plane.pids == {}
    for pid in pids.values():
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    with socket.socket() as sock:  # the API server's port is free again
        sock.bind(("127.0.0.1", plane.port))
    assert {p.name for p in (tmp_path / "logs").iterdir()} == {
        "etcd.log", "kube-apiserver.log", "kube-controller-manager.log"}


# ---------------------------------------------------------------- the running cluster


def test_version_is_the_pinned_release(control_plane: ControlPlane) -> None:
    with admin_json(control_plane) as api:
        version = api.call("GET", "/version")
    assert version["gitVersion"] == KUBERNETES_VERSION
    assert (version["major"], version["minor"]) == ("1", "37")


def test_every_persona_has_a_token_kubeconfig(control_plane: ControlPlane) -> None:
    for user in PERSONA_USERS:
        path = control_plane.kubeconfig_for(user)
        assert path.stat().st_mode & 0o077 == 0, f"{path} is readable by others"
        with JsonApi(path) as api:
            review = api.call("POST", "/apis/authentication.k8s.io/v1/selfsubjectreviews", body={
                "apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"})
        assert review["status"]["userInfo"]["username"] == user


def test_rbac_denies_a_user_without_bindings(control_plane: ControlPlane) -> None:
    with JsonApi(control_plane.kubeconfig_for(NOBODY)) as api, \
            pytest.raises(ApiException) as denied:
        api.call("GET", "/api/v1/nodes")
    assert denied.value.status == 403
    assert f'User "{NOBODY}" cannot list resource "nodes"' in _message(denied.value)
    with admin_json(control_plane) as api:
        assert api.call("GET", "/api/v1/nodes")["kind"] == "NodeList"


def _allowed(api: JsonApi, method: str, path: str) -> bool:
    """Whether the call is authorized (any answer but 403)."""
    try:
        api.call(method, path)
    except ApiException as exc:
        return bool(exc.status != 403)
    return True


def _message(exc: ApiException) -> str:
    message: str = json.loads(exc.body or "{}")["message"]
    return message


def test_a_certificate_user_gets_exactly_what_its_group_is_bound_to(
        control_plane: ControlPlane, k8s_namespace: str) -> None:
    group = f"viewers-{secrets.token_hex(3)}"
    pods = f"/api/v1/namespaces/{k8s_namespace}/pods"
    with admin_json(control_plane) as api:
        api.call("POST", f"/apis/rbac.authorization.k8s.io/v1/namespaces/{k8s_namespace}"
                         "/rolebindings", body={
            "metadata": {"name": "viewers"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                        "name": "view"},
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "Group",
                          "name": group}]})
    with JsonApi(control_plane.kubeconfig_for("carol", [group])) as api:
        wait_for(lambda: _allowed(api, "GET", pods), 10, "the RoleBinding to take effect")
        with pytest.raises(ApiException) as denied:
            api.call("DELETE", pods)
        assert denied.value.status == 403
        assert 'User "carol" cannot deletecollection' in _message(denied.value)
    with JsonApi(control_plane.kubeconfig_for("dave", ["someone-else"])) as api:
        assert not _allowed(api, "GET", pods)


def _running(api: JsonApi, namespace: str) -> list[dict[str, Any]]:
    pods: list[dict[str, Any]] = api.call("GET", f"/api/v1/namespaces/{namespace}/pods")["items"]
    return pods if all(p["status"].get("phase") == "Running" for p in pods) else []


def test_the_disruption_controller_keeps_pdb_status_and_eviction_honours_it(
        control_plane: ControlPlane, k8s_namespace: str, node_sim: NodeSimulator) -> None:
    node_sim.add_nodes(2)
    ns = f"/namespaces/{k8s_namespace}"
    pdb_path = f"/apis/policy/v1{ns}/poddisruptionbudgets/db"
    with admin_json(control_plane) as api:
        api.call("POST", f"/apis/apps/v1{ns}/deployments", body=deployment("db", 3))
        api.call("POST", f"/apis/policy/v1{ns}/poddisruptionbudgets", body={
            "metadata": {"name": "db"},
            "spec": {"minAvailable": 3, "selector": {"matchLabels": {"app": "db"}}}})

        def healthy(count: int) -> dict[str, Any] | None:
            status: dict[str, Any] = api.call("GET", pdb_path).get("status", {})
            return status if status.get("currentHealthy") == count else None

        status = wait_for(lambda: healthy(3), 30, "the PDB to count 3 healthy pods")
        assert (status["desiredHealthy"], status["expectedPods"],
                status["disruptionsAllowed"]) == (3, 3, 0)
        victim = _running(api, k8s_namespace)[0]["metadata"]["name"]
        eviction = {"apiVersion": "policy/v1", "kind": "Eviction",
                    "metadata": {"name": victim, "namespace": k8s_namespace}}
        evict = f"/api/v1{ns}/pods/{victim}/eviction"
        with pytest.raises(ApiException) as refused:
            api.call("POST", evict, body=eviction)
        assert refused.value.status == 429

        api.call("PATCH", pdb_path, patch=True, body={"spec": {"minAvailable": 2}})
        wait_for(lambda: api.call("GET", pdb_path)["status"].get("disruptionsAllowed") == 1,
                 30, "one allowed disruption")
        api.call("POST", evict, body=eviction)

        def replaced() -> bool:
            pods = _running(api, k8s_namespace)
            return len(pods) == 3 and victim not in {p["metadata"]["name"] for p in pods}

        wait_for(replaced, 30, "the evicted pod to be gone and replaced")


def test_the_api_server_can_be_stopped_and_started_again(
        control_plane: ControlPlane, k8s_namespace: str, node_sim: NodeSimulator) -> None:
    node_sim.add_nodes(1)
    url = control_plane.url
    namespace = f"/api/v1/namespaces/{k8s_namespace}"
    control_plane.stop_apiserver()
    try:
        assert not control_plane.ready()
        assert "kube-apiserver" not in control_plane.pids
        with admin_json(control_plane) as api, pytest.raises(urllib3.exceptions.HTTPError):
            api.call("GET", namespace)
    finally:
        control_plane.start_apiserver()
    assert control_plane.ready()
    assert control_plane.url == url
    with admin_json(control_plane) as api:
        assert api.call("GET", namespace)["metadata"]["name"] == k8s_namespace  # same etcd
        api.call("POST", f"{namespace}/pods", body={
            "metadata": {"name": "after-outage"},
            "spec": {"containers": [{"name": "app", "image": "registry.invalid/app:1"}]}})
        wait_for(lambda: api.call("GET", f"{namespace}/pods/after-outage")["status"]
                 .get("phase") == "Running", 30, "the simulator to run a pod after the outage")
