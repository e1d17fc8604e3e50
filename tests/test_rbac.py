"""RBAC from scopes: ``render rbac`` grants exactly what the scopes need, and the API agrees.

Pure checks first (the rendered YAML, hand-written expectations for the shipped
personas, the runtime check against the rules), then the real API server: the shipped
personas' RBAC is applied as the admin, and each persona, under its own token user,
runs every Kubernetes action (allowed ones succeed, the others get 403) and asks
``SelfSubjectAccessReview`` about every verb on every resource in reach, which must
match the rendered rules exactly.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from kubernetes import client
from ruamel.yaml import YAML

from bus.messages import Target
from lab.controlplane import ControlPlane
from lab.fleet import apply_rbac
from lab.nodesim import NodeSimulator, api_client
from runtime.config.loading import ConfigSet, config_paths, load
from runtime.core.authorizing import authorize
from runtime.core.engine import Intent
from runtime.kube.acting import ClientApi, KubeApi, kubernetes_actuators
from runtime.model.catalog import PERSONA_ANNOTATION, REPAIR_ANNOTATION, DrainParams
from runtime.model.formats import Persona
from runtime.model.scopes import VOCABULARY, allows
from runtime.ops.cli import main
from runtime.ops.render.rbac import (
    API_GROUPS,
    NEEDS,
    READ_VERBS,
    Grant,
    granted,
    render_all,
    render_rbac,
    role_name,
)
from tests.builders import intent
from tests.k8s import admin_api
from tests.test_k8s_acting import labelled, wait_for

REPO = Path(__file__).resolve().parent.parent
SHIPPED: ConfigSet = load(config_paths(REPO))
PERSONAS = sorted(SHIPPED.personas)
K8S_SCOPES = sorted(s for s in VOCABULARY if s.startswith("k8s:"))

INDISTINGUISHABLE = {("vera", "k8s:nodes:cordon")}
"""Where RBAC cannot follow the scopes: RBAC names a verb on a resource, not what a patch
changes, and cordon, uncordon and drain all patch ``spec.unschedulable`` of a node. So
Vera, granted uncordon, may patch nodes, and only the runtime check stops her cordoning."""


def persona(name: str) -> Persona:
    return SHIPPED.persona(name)


def documents(text: str) -> list[dict[str, Any]]:
    return list(YAML(typ="safe").load_all(io.StringIO(text)))


def writes(name: str) -> set[tuple[str, str]]:
    """(resource, verb) for every verb beyond reading the persona may use."""
    return {(g.resource, g.verb) for g in granted(persona(name).spec.effective_scopes)
            if g.verb not in READ_VERBS}


# ---------------------------------------------------------------- rendering


def test_every_kubernetes_scope_stands_for_some_api_calls() -> None:
    assert sorted(NEEDS) == K8S_SCOPES
    assert all(NEEDS.values())


@pytest.mark.parametrize("name", PERSONAS)
def test_rendered_rbac_binds_a_cluster_role_to_the_persona_user(name: str) -> None:
    who = persona(name)
    role, binding = documents(render_rbac(who))
    assert role["kind"] == "ClusterRole"
    assert role["metadata"]["name"] == role_name(who) == f"zeta-agent:{name}"
    assert binding["kind"] == "ClusterRoleBinding"
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io",
                                  "kind": "ClusterRole", "name": role_name(who)}
    assert binding["subjects"] == [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User",
                                    "name": who.spec.identity.kubernetes.user}]
    rendered = {Grant(group, resource, verb) for rule in role["rules"]
                for group in rule["apiGroups"] for resource in rule["resources"]
                for verb in rule["verbs"]}
    assert rendered == set(granted(who.spec.effective_scopes))


def test_the_shipped_personas_get_exactly_these_writes() -> None:
    assert writes("otto") == {("nodes", "patch"), ("pods/eviction", "create"),
                              ("deployments", "patch"), ("statefulsets", "patch")}
    assert writes("vera") == {("nodes", "patch")}
    assert writes("alexa") == writes("riven") == writes("lior") == set()


def test_everyone_reads_every_readable_resource_and_nothing_else() -> None:
    for name in PERSONAS:
        reads = {(g.group, g.resource) for g in granted(persona(name).spec.effective_scopes)
                 if g.verb in READ_VERBS}
        assert reads == {(group, resource) for resource, groups in API_GROUPS.items()
                         for group in groups}, name


def test_the_rules_name_the_scopes_they_come_from() -> None:
    text = render_rbac(persona("otto"))
    assert "  # k8s:nodes:drain\n  - apiGroups: [\"\"]\n    resources: [\"pods/eviction\"]\n" \
           '    verbs: ["create"]\n' in text


@pytest.mark.parametrize("name", PERSONAS)
@pytest.mark.parametrize("scope", K8S_SCOPES)
def test_the_runtime_check_and_rbac_agree(name: str, scope: str) -> None:
    scopes = persona(name).spec.effective_scopes
    rbac_allows = set(NEEDS[scope]) <= set(granted(scopes))
    if allows(scopes, scope):
        assert rbac_allows
    else:
        assert rbac_allows == ((name, scope) in INDISTINGUISHABLE)


SCOPE_SETS = st.lists(st.sampled_from(
    [*K8S_SCOPES, "k8s:*:read", "k8s:nodes:*", "k8s:*:restart", "k8s:*:*", "k8s:pods:*"]),
    max_size=6)


@given(SCOPE_SETS)
def test_rbac_grants_what_each_allowed_scope_needs_and_nothing_without_one(
        scopes: list[str]) -> None:
    given_grants = set(granted(scopes))
    allowed = [s for s in K8S_SCOPES if allows(scopes, s)]
    assert given_grants == {g for s in allowed for g in NEEDS[s]}


def test_render_rbac_cli(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["render", "rbac", "--config-dir", str(REPO), "otto"]) == 0
    assert capsys.readouterr().out == render_rbac(persona("otto"))
    assert main(["render", "rbac", "--config-dir", str(REPO), "--all"]) == 0
    out = capsys.readouterr().out
    assert out == render_all(p.value for p in SHIPPED.personas.values())
    roles = [d["metadata"]["name"] for d in documents(out) if d["kind"] == "ClusterRole"]
    assert roles == [f"zeta-agent:{name}" for name in PERSONAS]


def test_render_rbac_of_an_unknown_persona_fails(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["render", "rbac", "--config-dir", str(REPO), "nobody"]) == 2
    assert "no persona 'nobody'" in capsys.readouterr().err


# ---------------------------------------------------------------- against a real API server


@pytest.fixture
def applied(control_plane: ControlPlane) -> ControlPlane:
    """The control plane with every shipped persona's rendered RBAC applied."""
    with admin_api(control_plane) as api:
        apply_rbac(api, render_all(p.value for p in SHIPPED.personas.values()))
    return control_plane


VERBS = ("get", "list", "watch", "create", "update", "patch", "delete", "deletecollection")
EXTRA = (Grant("", "secrets", "get"), Grant("", "secrets", "list"),
         Grant("", "pods/exec", "create"), Grant("", "nodes/status", "patch"),
         Grant("", "pods/status", "patch"), Grant("", "pods/eviction", "create"),
         Grant("apps", "deployments/scale", "patch"),
         Grant("rbac.authorization.k8s.io", "clusterroles", "create"))
UNIVERSE = sorted({*(Grant(group, resource, verb) for resource, groups in API_GROUPS.items()
                     for group in groups for verb in VERBS), *EXTRA})
"""Every verb on every resource a persona could read, and a few that nobody gets."""


def may(api: client.ApiClient, grant: Grant) -> bool:
    resource, _, subresource = grant.resource.partition("/")
    review = client.AuthorizationV1Api(api).create_self_subject_access_review(
        client.V1SelfSubjectAccessReview.model_validate({"spec": {"resourceAttributes": {
            "group": grant.group, "resource": resource, "subresource": subresource,
            "verb": grant.verb}}}))
    return bool(review.status and review.status.allowed)


@pytest.mark.parametrize("name", PERSONAS)
def test_the_api_server_allows_exactly_the_rendered_rules(applied: ControlPlane,
                                                          name: str) -> None:
    who = persona(name)
    expected = set(granted(who.spec.effective_scopes))
    with api_client(applied.kubeconfig_for(who.spec.identity.kubernetes.user)) as api:
        allowed = {grant for grant in UNIVERSE if may(api, grant)}
    assert allowed == expected & set(UNIVERSE)
    assert expected <= set(UNIVERSE)


# The table: every Kubernetes action, on a target made for it in a fresh namespace.
ACTIONS = ("k8s.node.cordon", "k8s.node.uncordon", "k8s.node.drain", "k8s.pod.delete",
           "restart deployment", "restart statefulset", "restart daemonset")


def targets(control_plane: ControlPlane, node_sim: NodeSimulator,
            namespace: str) -> dict[str, Intent]:
    """One intent per action of ``ACTIONS``, each on its own, real target."""
    free, cordoned, draining = node_sim.add_nodes(3)
    with admin_api(control_plane) as api:
        core, apps = client.CoreV1Api(api), client.AppsV1Api(api)
        core.patch_node(cordoned, {"metadata": {"annotations": {
            REPAIR_ANNOTATION: "R0", PERSONA_ANNOTATION: "otto"}}, "spec": {"unschedulable": True}})
        pinned = labelled("pinned")
        pinned["template"]["spec"]["nodeSelector"] = {"kubernetes.io/hostname": draining}
        apps.create_namespaced_deployment(namespace, client.V1Deployment.model_validate(
            {"metadata": {"name": "pinned"}, "spec": {"replicas": 1, **pinned}}))
        apps.create_namespaced_stateful_set(namespace, client.V1StatefulSet.model_validate(
            {"metadata": {"name": "db"}, "spec": {"replicas": 1, "serviceName": "db",
                                                  **labelled("db")}}))
        apps.create_namespaced_daemon_set(namespace, client.V1DaemonSet.model_validate(
            {"metadata": {"name": "agent"}, "spec": labelled("agent")}))
        [victim] = wait_for("the pinned pod running", lambda: [
            p.metadata.name for p in core.list_namespaced_pod(
                namespace, label_selector="app=pinned").items
            if p.metadata and p.status and p.status.phase == "Running"])

    def workload(kind: str, name: str) -> Intent:
        return intent("k8s.workload.restart", Target.model_validate(
            {"kind": kind, "name": name, "namespace": namespace}))

    return {
        "k8s.node.cordon": intent("k8s.node.cordon", Target(kind="node", name=free)),
        "k8s.node.uncordon": intent("k8s.node.uncordon", Target(kind="node", name=cordoned)),
        "k8s.node.drain": intent("k8s.node.drain", Target(kind="node", name=draining),
                                 DrainParams.model_validate({"timeout": "30s"})),
        "k8s.pod.delete": intent("k8s.pod.delete",
                                 Target(kind="pod", name=victim, namespace=namespace)),
        "restart deployment": workload("deployment", "pinned"),
        "restart statefulset": workload("statefulset", "db"),
        "restart daemonset": workload("daemonset", "agent"),
    }


SUCCEEDS = {
    "otto": {"k8s.node.cordon", "k8s.node.uncordon", "k8s.node.drain", "restart deployment",
             "restart statefulset"},
    "vera": {"k8s.node.uncordon", "k8s.node.cordon"},  # cordon: see INDISTINGUISHABLE
}
"""What each shipped persona's calls achieve at the API server (everyone else: nothing)."""


def scope_of(it: Intent) -> str:
    return it.action.scope_for(it.target, it.params)


@pytest.mark.parametrize("name", PERSONAS)
async def test_each_persona_can_do_what_its_scopes_allow_and_gets_403_otherwise(
        applied: ControlPlane, node_sim: NodeSimulator, k8s_namespace: str,
        name: str) -> None:
    who = persona(name)
    api: KubeApi = ClientApi.from_kubeconfig(
        applied.kubeconfig_for(who.spec.identity.kubernetes.user))
    actuators = kubernetes_actuators(api, who)
    table = targets(applied, node_sim, k8s_namespace)
    succeeded = set()
    for action in ACTIONS:
        it = table[action]
        outcome = await actuators[it.action.name].run(it, repair="01JTABLE", dry_run=False,
                                                      fence=_always)
        if outcome.ok:
            succeeded.add(action)
        if allows(who.spec.effective_scopes, scope_of(it)):
            assert outcome.ok, f"{name} {action}: {outcome.detail}"
        elif (name, scope_of(it)) in INDISTINGUISHABLE:
            assert outcome.ok, f"{name} {action}: {outcome.detail}"
            verdict = authorize(who, it, quorum_refusal=None)
            assert not verdict.allowed
            assert verdict.reason.startswith(f"scope {scope_of(it)} is not granted to {name}")
        else:
            assert not outcome.ok
            assert outcome.detail.startswith("scope/RBAC mismatch: "), \
                f"{name} {action}: {outcome.detail}"
            assert f'User "{who.spec.identity.kubernetes.user}" cannot ' in outcome.detail
    assert succeeded == SUCCEEDS.get(name, set())


async def _always() -> bool:
    return True


@pytest.mark.parametrize("name", PERSONAS)
def test_each_persona_reads_every_readable_resource(applied: ControlPlane, name: str) -> None:
    who = persona(name)
    with api_client(applied.kubeconfig_for(who.spec.identity.kubernetes.user)) as api:
        core, apps = client.CoreV1Api(api), client.AppsV1Api(api)
        for read in (core.list_node, core.list_pod_for_all_namespaces, core.list_namespace,
                     core.list_event_for_all_namespaces, apps.list_deployment_for_all_namespaces,
                     apps.list_stateful_set_for_all_namespaces,
                     apps.list_daemon_set_for_all_namespaces,
                     apps.list_replica_set_for_all_namespaces,
                     client.CoordinationV1Api(api).list_lease_for_all_namespaces,
                     client.PolicyV1Api(api).list_pod_disruption_budget_for_all_namespaces,
                     client.EventsV1Api(api).list_event_for_all_namespaces):
            # Raw: the client cannot decode events.k8s.io Events whose eventTime is null
            # (core Events seen through that group), and only the answer matters here.
            response: Any = read(_preload_content=False)
            assert response.status == 200
