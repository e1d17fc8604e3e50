"""Finding target and action target, both directions in one place.

A finding is about what a detector looked at (a node, a pod's owner, a unit, the API
server); the action a policy step names may act on something else (``host.unit.restart``
on a node finding acts on ``unit.<node>/kubelet.service``, ``host.node.reboot`` on
``host.<node>``). The proposer maps finding to action target; every voter maps the
proposal's action target back to the finding it must see for itself. The way back is
computed from the way there (``finding_behind`` searches the voter's own matches with
``action_target``), so the two directions cannot disagree.
"""

from __future__ import annotations

from collections.abc import Iterable

from bus.messages import Target
from runtime.model.catalog import OPT_OUT_LABEL, Action, Params, UnitParams
from runtime.model.formats import opted_out
from runtime.model.snapshot import Snapshot

WORKLOAD_KINDS = frozenset({"deployment", "statefulset", "daemonset"})


def action_target(action: Action, params: Params, finding: Target,
                  host: str | None) -> Target | str:
    """The target ``action`` acts on for a finding on ``finding``, or why it cannot apply.

    ``host`` is the snapshot's host, the fallback for units of non-node findings.
    """
    if action.name.startswith("host.unit."):
        assert isinstance(params, UnitParams)
        on = finding.host or (finding.name if finding.kind == "node" else host)
        return Target(kind="unit", name=params.unit, host=on)
    if action.name == "host.node.reboot" and finding.kind == "node":
        return Target(kind="host", name=finding.name)
    if finding.kind in action.targets:
        return finding
    what = f"{finding.kind} {finding.namespace + '/' if finding.namespace else ''}{finding.name}"
    return f"{action.name} acts on {'/'.join(action.targets)}, not on {what}"


def finding_behind(action: Action, params: Params, target: Target,
                   findings: Iterable[Target]) -> Target | None:
    """The finding among ``findings`` (a voter's own matches) that ``action`` on
    ``target`` repairs, or None if none of them leads there.

    A unit's host stands in for the snapshot host of the proposer: a unit action on a
    finding with no host of its own (the API server) acts on the proposer's host.
    """
    for finding in findings:
        if action_target(action, params, finding, target.host) == target:
            return finding
    return None


def opt_out(target: Target, snapshot: Snapshot) -> str | None:
    """Why no agent may act on ``target`` as ``snapshot`` shows it, or None.

    A node opts out itself and every action on its host (a unit, a reboot); a pod opts
    out itself; a workload opts out through its pods' labels (its pod template's), the
    labels the agents watch.
    """
    node = (target.name if target.kind in ("node", "host")
            else target.host if target.kind == "unit" else None)
    mark = f"{OPT_OUT_LABEL}=true"
    if node and snapshot.nodes is not None:
        for seen in snapshot.nodes:
            if seen.name == node and opted_out(seen.labels):
                return f"node {node} is labelled {mark}: no agent acts on it or its host"
    if target.kind == "pod" and snapshot.pods is not None:
        for pod in snapshot.pods:
            if (pod.namespace, pod.name) == (target.namespace, target.name) and opted_out(
                    pod.labels):
                return f"pod {target.namespace}/{target.name} is labelled {mark}"
    if target.kind in WORKLOAD_KINDS and snapshot.pods is not None:
        for pod in snapshot.pods:
            if pod.owner == target and opted_out(pod.labels):
                return (f"{target.kind} {target.namespace}/{target.name} has pods labelled "
                        f"{mark}")
    return None
