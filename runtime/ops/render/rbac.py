"""Kubernetes RBAC from scopes: the API server refuses what a persona's scopes do not grant.

``zeta-agent render rbac <persona>`` prints a ClusterRole and a ClusterRoleBinding for
the persona's Kubernetes user (``spec.identity.kubernetes.user``) with exactly the verbs
its effective scopes need, no more: each scope of the vocabulary maps to the API calls
the observers and actuators make for it (``NEEDS``), and a persona gets a scope's calls
when ``scopes.allows`` grants it that scope, the same function the runtime check uses.
Server-side dry runs (``dryRun=All``) are authorized like the real call, so they need no
extra verb. Pure rendering: no I/O.

Scalars are written as JSON strings, which YAML reads as they are, so no name can be
misread as another type or break the layout.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from runtime.model.formats import Persona
from runtime.model.scopes import K8S_READABLE, RESTARTABLE_WORKLOADS, allows

MANAGED_BY = "zeta-agent"
READ_VERBS = ("get", "list", "watch")

API_GROUPS: dict[str, tuple[str, ...]] = {
    "nodes": ("",), "pods": ("",), "namespaces": ("",),
    # Events are served by two groups; an observer may read either.
    "events": ("", "events.k8s.io"),
    "leases": ("coordination.k8s.io",),
    "deployments": ("apps",), "statefulsets": ("apps",), "daemonsets": ("apps",),
    "replicasets": ("apps",),
    "poddisruptionbudgets": ("policy",),
}
"""The API group(s) of every resource a scope can name."""


@dataclass(frozen=True, order=True)
class Grant:
    """One verb on one resource (``pods/eviction`` is a subresource) in one API group."""

    group: str
    resource: str
    verb: str


def _on(resource: str, *verbs: str, group: str | None = None) -> tuple[Grant, ...]:
    groups = (group,) if group is not None else API_GROUPS[resource.split("/", maxsplit=1)[0]]
    return tuple(Grant(g, resource, verb) for g in groups for verb in verbs)


# The calls runtime/kube/acting.py makes for each action: cordon and uncordon read
# the node and patch it (with its resourceVersion, so a concurrent change is a 409);
# drain cordons, lists the node's pods (and lists again while it waits for them to go)
# and evicts through the Eviction subresource, never deleting; a restart reads the
# workload (a paused or OnDelete one would not restart) and patches its template.
NEEDS: dict[str, tuple[Grant, ...]] = {
    **{f"k8s:{r}:read": _on(r, *READ_VERBS) for r in K8S_READABLE},
    "k8s:nodes:cordon": _on("nodes", "get", "patch"),
    "k8s:nodes:uncordon": _on("nodes", "get", "patch"),
    "k8s:nodes:drain": (*_on("nodes", "get", "patch"), *_on("pods", "list"),
                        *_on("pods/eviction", "create")),
    "k8s:pods:delete": _on("pods", "delete"),
    **{f"k8s:{w}:restart": _on(w, "get", "patch") for w in RESTARTABLE_WORKLOADS},
}
"""Every Kubernetes scope of the vocabulary, with the API calls it stands for."""

def granted(scopes: Iterable[str]) -> dict[Grant, tuple[str, ...]]:
    """The API calls ``scopes`` allow, each with the given scopes it comes from."""
    scopes = tuple(scopes)
    reasons: dict[Grant, set[str]] = {}
    for need, grants in NEEDS.items():
        why = {scope for scope in scopes if allows([scope], need)}
        for grant in grants if why else ():
            reasons.setdefault(grant, set()).update(why)
    return {grant: tuple(sorted(why)) for grant, why in sorted(reasons.items())}


@dataclass(frozen=True)
class Rule:
    """One PolicyRule: verbs on resources of one API group, and the scopes that ask for it."""

    group: str
    resources: tuple[str, ...]
    verbs: tuple[str, ...]
    scopes: tuple[str, ...]


def rules(scopes: Iterable[str]) -> list[Rule]:
    """The fewest readable rules: resources of a group sharing the same verbs go together."""
    by_resource: dict[tuple[str, str], tuple[set[str], set[str]]] = {}
    for grant, why in granted(scopes).items():
        verbs, reasons = by_resource.setdefault((grant.group, grant.resource), (set(), set()))
        verbs.add(grant.verb)
        reasons.update(why)
    merged: dict[tuple[str, tuple[str, ...]], tuple[list[str], set[str]]] = {}
    for (group, resource), (verbs, reasons) in by_resource.items():
        resources, scopes_of = merged.setdefault((group, tuple(sorted(verbs))), ([], set()))
        resources.append(resource)
        scopes_of.update(reasons)
    return sorted((Rule(group, tuple(sorted(resources)), verbs, tuple(sorted(scopes_of)))
                   for (group, verbs), (resources, scopes_of) in merged.items()),
                  key=lambda rule: (rule.group, rule.resources))


def role_name(persona: Persona) -> str:
    """The ClusterRole (and ClusterRoleBinding) of ``persona``."""
    return f"{MANAGED_BY}:{persona.name}"


def _q(value: str) -> str:
    return json.dumps(value)


def _flow(values: Sequence[str]) -> str:
    return "[" + ", ".join(map(_q, values)) + "]"


def render_rbac(persona: Persona) -> str:
    """ClusterRole + ClusterRoleBinding YAML granting ``persona``'s user what its scopes need."""
    spec, name = persona.spec, role_name(persona)
    labels = (f"{{\"app.kubernetes.io/managed-by\": {_q(MANAGED_BY)}, "
              f"\"zeta-agent/persona\": {_q(persona.name)}}}")
    found = rules(spec.effective_scopes)
    lines = [
        f"# Rendered by `zeta-agent render rbac` for persona {persona.name} "
        f"(tier {spec.tier.value}); do not edit.",
        "# Exactly the API calls its scopes need: the runtime refuses any other action, and",
        "# the API server refuses any other call.",
        "apiVersion: rbac.authorization.k8s.io/v1",
        "kind: ClusterRole",
        "metadata:",
        f"  name: {_q(name)}",
        f"  labels: {labels}",
    ]
    if not found:
        lines.append("rules: []  # no k8s scope")
    else:
        lines.append("rules:")
        for rule in found:
            lines += [f"  # {', '.join(rule.scopes)}",
                      f"  - apiGroups: {_flow([rule.group])}",
                      f"    resources: {_flow(rule.resources)}",
                      f"    verbs: {_flow(rule.verbs)}"]
    lines += [
        "---",
        "apiVersion: rbac.authorization.k8s.io/v1",
        "kind: ClusterRoleBinding",
        "metadata:",
        f"  name: {_q(name)}",
        f"  labels: {labels}",
        "roleRef:",
        '  apiGroup: "rbac.authorization.k8s.io"',
        '  kind: "ClusterRole"',
        f"  name: {_q(name)}",
        "subjects:",
        '  - apiGroup: "rbac.authorization.k8s.io"',
        '    kind: "User"',
        f"    name: {_q(spec.identity.kubernetes.user)}",
    ]
    return "\n".join(lines) + "\n"


def render_all(personas: Iterable[Persona]) -> str:
    """Every persona's RBAC, by name, as one multi-document YAML stream."""
    return "---\n".join(render_rbac(p) for p in sorted(personas, key=lambda p: p.name))
