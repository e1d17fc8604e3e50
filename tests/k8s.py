"""Fixtures for tests against a real Kubernetes API server (conftest.py exposes them).

``control_plane`` (session): etcd + kube-apiserver + kube-controller-manager built
from the pinned release (lab/building.py) and started once per session,
with a token user per persona. ``k8s_namespace``: a fresh namespace per test, deleted
afterwards. ``node_sim``: a node simulator (kubelets and scheduler) per test; its
nodes and their pods are removed afterwards so the next test starts with none.

Without Go, or if the build fails, the tests skip locally and fail in CI
(tests/prereq.py).
"""

from __future__ import annotations

import re
import secrets
import sys
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

import pytest
from kubernetes import client

from lab.building import Binaries, ensure_binaries
from lab.controlplane import ControlPlane
from lab.fleet import deployment
from lab.nodesim import JsonApi, NodeSimulator, api_client
from lab.tools import Progress, ToolUnavailableError
from tests.prereq import missing

PERSONA_USERS = ("zeta-otto", "zeta-alexa", "zeta-riven", "zeta-vera", "zeta-lior")
NOBODY = "zeta-nobody"
"""A token user that no test binds to anything: what RBAC gives nobody."""
NAMESPACE_READY = 30.0
# The tests' Deployment manifests are the lab's (lab.fleet).
__all__ = ["NOBODY", "PERSONA_USERS", "admin_api", "admin_json", "control_plane", "deployment",
           "k8s_binaries", "k8s_namespace", "node_sim", "past_capture", "wait_for"]
T = TypeVar("T")


def past_capture(config: pytest.Config) -> Progress:
    """Progress lines that reach the terminal through pytest's output capture."""
    capture = config.pluginmanager.getplugin("capturemanager")

    def progress(line: str) -> None:
        with capture.global_and_fixture_disabled():
            print(line, file=sys.stderr, flush=True)

    return progress


@pytest.fixture(scope="session")
def k8s_binaries(pytestconfig: pytest.Config) -> Binaries:
    """The control-plane binaries. The first run on a machine builds them (minutes),
    saying so past pytest's capture; without Go it skips (fails in CI)."""
    try:
        return ensure_binaries(progress=past_capture(pytestconfig))
    except ToolUnavailableError as exc:
        missing(f"no Kubernetes control plane: {exc}")


@pytest.fixture(scope="session")
def control_plane(tmp_path_factory: pytest.TempPathFactory,
                  k8s_binaries: Binaries) -> Iterator[ControlPlane]:
    """A real control plane for the whole session (users: the personas' and ``zeta-nobody``)."""
    binaries = k8s_binaries
    plane = ControlPlane(tmp_path_factory.mktemp("k8s"), users=[*PERSONA_USERS, NOBODY],
                         binaries=binaries)
    with plane:
        yield plane


def admin_api(plane: ControlPlane) -> client.ApiClient:
    """An API client with the admin's kubeconfig (close it when done)."""
    return api_client(plane.admin_kubeconfig)


def admin_json(plane: ControlPlane) -> JsonApi:
    """A JSON API client with the admin's kubeconfig (close it when done)."""
    return JsonApi(plane.admin_kubeconfig)


@pytest.fixture
def k8s_namespace(control_plane: ControlPlane, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh namespace, named after the test, whose ``default`` ServiceAccount exists
    (so pods can be created at once). Deleted afterwards without waiting."""
    stem = re.sub(r"[^a-z0-9-]+", "-", request.node.name.lower()).strip("-")[:40].strip("-")
    name = f"{stem}-{secrets.token_hex(3)}"
    with admin_api(control_plane) as api:
        core = client.CoreV1Api(api)
        core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
        deadline = time.monotonic() + NAMESPACE_READY
        while not core.list_namespaced_service_account(
                name, field_selector="metadata.name=default").items:
            if time.monotonic() > deadline:
                pytest.fail(f"the default ServiceAccount of {name} never appeared")
            time.sleep(0.1)
        yield name
        core.delete_namespace(name, propagation_policy="Background")


@pytest.fixture
def node_sim(control_plane: ControlPlane) -> Iterator[NodeSimulator]:
    """A running node simulator with no nodes yet (``add_nodes``); afterwards its nodes,
    their Leases and the pods bound to them are gone."""
    with NodeSimulator(control_plane.admin_kubeconfig, kubelet_ports=True) as sim:
        yield sim


def wait_for(check: Callable[[], T | None], timeout: float, what: str, *,
             every: float = 0.1) -> T:
    """Poll ``check`` until it returns something other than None or False; that value.
    Fails the test, saying ``what`` was awaited, after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value is not None and value is not False:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(every)
