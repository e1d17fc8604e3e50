"""The action catalog: every action an agent can ever take, with its safety floor.

Policies and brains pick from this table and nothing else. Each entry fixes the
scope an action needs for a given target, whether it is destructive, the least
quorum it may run under, and what undoes it. A policy may tighten an entry (mark it
destructive, ask for more approvals), never loosen it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from bus.messages import Target, TargetKind
from runtime.model.durations import Duration


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class NoParams(Params):
    """The action needs nothing beyond its target."""


class DrainParams(Params):
    timeout: Duration = Field(
        default=timedelta(minutes=5),
        description="Give up evicting after this long and report what is left.")


class PodDeleteParams(Params):
    gracePeriodSeconds: int | None = Field(default=None, ge=0)  # noqa: N815 (wire name)


UnitName = Annotated[str, Field(
    pattern=r"^[A-Za-z0-9][A-Za-z0-9@._-]*\.(service|socket|target|timer)$")]


class UnitParams(Params):
    unit: UnitName = Field(description="The systemd unit, e.g. kubelet.service.")


class EscalateParams(Params):
    message: str = Field(default="", max_length=500)


@dataclass(frozen=True)
class Action:
    """One catalog entry."""

    name: str
    targets: tuple[TargetKind, ...]
    params: type[Params]
    destructive: bool
    # Fewest distinct approving personas (the proposer counts once); 1 means the
    # action may run on its own author's word, which only non-destructive ones do.
    min_approvals: int
    undo: str | None
    _scope: Callable[[Target, Params], str]
    summary: str

    def scope_for(self, target: Target, params: Params) -> str:
        """The scope a persona needs to run this action on ``target``."""
        return self._scope(target, params)


def _unit_scope(verb: str) -> Callable[[Target, Params], str]:
    def scope(_target: Target, params: Params) -> str:
        assert isinstance(params, UnitParams)
        return f"host:units:{verb}:{params.unit}"

    return scope


def _fixed(scope: str) -> Callable[[Target, Params], str]:
    return lambda _target, _params: scope


DESTRUCTIVE_MIN_APPROVALS = 2

# Written by k8s.node.cordon on the node, read by the cordon-without-owner detector:
# a cordon is "owned" while the repair named here still holds its lease. Cordons
# without these annotations were placed by people and are never lifted by an agent.
REPAIR_ANNOTATION = "zeta-agent/repair"
PERSONA_ANNOTATION = "zeta-agent/persona"
# A node, pod or workload labelled ``zeta-agent/opt-out=true`` is never detected as
# broken nor acted on by any agent: its owners repair it themselves.
OPT_OUT_LABEL = "zeta-agent/opt-out"

CATALOG: dict[str, Action] = {
    a.name: a
    for a in (
        Action("k8s.node.cordon", ("node",), NoParams, True, DESTRUCTIVE_MIN_APPROVALS,
               "k8s.node.uncordon", _fixed("k8s:nodes:cordon"),
               "Mark the node unschedulable, annotated with the repair and the persona."),
        Action("k8s.node.uncordon", ("node",), NoParams, False, 1, None,
               _fixed("k8s:nodes:uncordon"), "Make the node schedulable again."),
        Action("k8s.node.drain", ("node",), DrainParams, True, DESTRUCTIVE_MIN_APPROVALS,
               "k8s.node.uncordon", _fixed("k8s:nodes:drain"),
               "Evict every evictable pod through the Eviction API, honouring PDBs."),
        Action("k8s.pod.delete", ("pod",), PodDeleteParams, True, DESTRUCTIVE_MIN_APPROVALS,
               None, _fixed("k8s:pods:delete"), "Delete one pod so its controller recreates it."),
        Action("k8s.workload.restart", ("deployment", "statefulset", "daemonset"), NoParams,
               True, DESTRUCTIVE_MIN_APPROVALS, None,
               lambda target, _params: f"k8s:{target.kind}s:restart",
               "Rolling restart through the restartedAt pod-template annotation."),
        Action("host.unit.start", ("unit",), UnitParams, False, 1, None, _unit_scope("start"),
               "Start a systemd unit that is not running (it was down: nothing is interrupted)."),
        Action("host.unit.restart", ("unit",), UnitParams, True, DESTRUCTIVE_MIN_APPROVALS, None,
               _unit_scope("restart"), "Restart a running systemd unit."),
        Action("host.node.reboot", ("host",), NoParams, True, DESTRUCTIVE_MIN_APPROVALS, None,
               _fixed("host:node:reboot"), "Reboot the host through systemd."),
        Action("agent.peer.restart", ("persona",), NoParams, False, 1, None,
               lambda target, _params: f"agent:peers:restart:{target.name}",
               "Restart zeta-agent@<peer>.service, whose heartbeats stopped."),
        Action("bus.lease.release", ("lease",), NoParams, True, DESTRUCTIVE_MIN_APPROVALS, None,
               _fixed("bus:leases:release"),
               "Delete a repair lease whose holder is gone, so the target can be repaired again."),
        Action("bus.escalate", ("humans", "node", "pod", "unit", "host", "persona", "lease",
                                "apiserver", "deployment", "statefulset", "daemonset"),
               EscalateParams, False, 1, None, _fixed("bus:escalate"),
               "Tell the humans: the ladder is exhausted or the situation needs judgement."),
    )
}


COMPENSATIONS = frozenset({"k8s.node.uncordon", "bus.lease.release"})
"""Actions that undo what a repair left behind (a cordon, a lease). A tripped breaker,
a frozen fleet and the budgets never hold them: a pause that kept a node cordoned or a
target leased would turn a stop into an outage of its own."""


class UnknownActionError(KeyError):
    pass


def lookup(name: str) -> Action:
    try:
        return CATALOG[name]
    except KeyError:
        raise UnknownActionError(
            f"unknown action {name!r}; the catalog has: {', '.join(sorted(CATALOG))}"
        ) from None
