"""Finding target and action target (runtime.core.targets): the executor's direction,
why an action cannot apply, and a property over the whole catalog that the voter's way
back always finds the finding the proposer started from."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bus.messages import Proposal, QuorumRule, Target
from runtime.agent.observing import Observing
from runtime.config.loading import config_paths, load
from runtime.core.detecting import APISERVER
from runtime.core.ports import Domain, Observed
from runtime.core.targets import action_target, finding_behind
from runtime.model.catalog import CATALOG, Action, Params, UnitParams
from runtime.model.snapshot import NodeObs, SourceStatus
from tests.builders import HOST, deployment, node, policy, unconnected_bus
from tests.conftest import REPO

WORKER = Target(kind="node", name="worker-1")
KUBELET_UNIT = UnitParams(unit="kubelet.service")


@pytest.mark.parametrize(
    ("action", "params", "finding", "expected"),
    [
        ("host.unit.start", KUBELET_UNIT, WORKER,
         Target(kind="unit", name="kubelet.service", host="worker-1")),
        ("host.unit.restart", UnitParams(unit="k3s.service"),
         Target(kind="apiserver", name="kube-apiserver"),
         Target(kind="unit", name="k3s.service", host=HOST)),
        ("host.unit.start", KUBELET_UNIT, Target(kind="unit", name="kubelet.service", host="w2"),
         Target(kind="unit", name="kubelet.service", host="w2")),
        ("host.node.reboot", None, WORKER, Target(kind="host", name="worker-1")),
        ("k8s.node.cordon", None, WORKER, WORKER),
        ("k8s.workload.restart", None, deployment("web"), deployment("web")),
        ("bus.escalate", None, deployment("web"), deployment("web")),
        ("bus.escalate", None, Target(kind="lease", name="node.a"),
         Target(kind="lease", name="node.a")),
        ("agent.peer.restart", None, Target(kind="persona", name="vera"),
         Target(kind="persona", name="vera")),
    ],
)
def test_remedy_targets_resolve_from_the_finding(action: str, params: Any, finding: Target,
                                                 expected: Target) -> None:
    entry = CATALOG[action]
    typed = params if params is not None else entry.params()
    assert action_target(entry, typed, finding, HOST) == expected


@pytest.mark.parametrize(
    ("action", "finding"),
    [
        ("k8s.workload.restart", Target(kind="pod", name="lone", namespace="default")),
        ("host.node.reboot", Target(kind="persona", name="vera")),
        ("k8s.node.cordon", Target(kind="unit", name="kubelet.service", host="w1")),
        ("k8s.pod.delete", deployment("web")),
    ],
)
def test_an_action_that_cannot_apply_says_why(action: str, finding: Target) -> None:
    reason = action_target(CATALOG[action], CATALOG[action].params(), finding, HOST)
    assert isinstance(reason, str)
    assert reason.startswith(f"{action} acts on ")
    assert finding.name in reason


NAMES = st.from_regex(r"[a-z][a-z0-9-]{0,8}", fullmatch=True)
HOSTS = st.sampled_from(["cp-1", "worker-1", "worker-2"])
# Each detector kind and the targets its matches carry (runtime.core.detecting).
FINDINGS: dict[str, st.SearchStrategy[Target]] = {
    "node-condition": st.builds(Target, kind=st.just("node"), name=NAMES),
    "cordon-without-owner": st.builds(Target, kind=st.just("node"), name=NAMES),
    "pod-crashloop": st.builds(Target, kind=st.sampled_from(
        ["pod", "deployment", "statefulset", "daemonset"]), name=NAMES,
        namespace=st.sampled_from(["default", "lab"])),
    "apiserver-unreachable": st.just(APISERVER),
    "unit-failed": st.builds(Target, kind=st.just("unit"), host=HOSTS,
                             name=st.sampled_from(["kubelet.service", "containerd.service"])),
    "peer-silent": st.builds(Target, kind=st.just("persona"), name=NAMES),
    "stale-lease": st.builds(Target, kind=st.just("lease"), name=NAMES.map("node.{}".format)),
}


def _params(action: Action, finding: Target) -> Params:
    if action.params is UnitParams:  # the unit a unit-failed finding names, else kubelet
        return UnitParams(unit=finding.name if finding.kind == "unit" else "kubelet.service")
    return action.params()


@pytest.mark.parametrize("kind", sorted(FINDINGS))
@pytest.mark.parametrize("name", sorted(CATALOG))
@given(data=st.data())
def test_every_action_target_leads_back_to_its_finding(name: str, kind: str,
                                                       data: Any) -> None:
    """For every catalog action and detector kind: whatever target the proposer acts
    on, a voter that sees the same finding among others of its kind finds it again."""
    action = CATALOG[name]
    finding = data.draw(FINDINGS[kind])
    params = _params(action, finding)
    host = data.draw(HOSTS)
    target = action_target(action, params, finding, host)
    if isinstance(target, str):
        return  # the engine refuses the step, saying why: there is no proposal to vote on
    others = data.draw(st.lists(FINDINGS[kind], max_size=3))
    seen = [o for o in others if o != finding]
    position = data.draw(st.integers(0, len(seen)))
    seen.insert(position, finding)
    back = finding_behind(action, params, target, seen)
    assert back is not None, (target, seen)
    assert action_target(action, params, back, target.host) == target
    if not [o for o in seen if o != finding and
            action_target(action, params, o, target.host) == target]:
        assert back == finding  # unambiguous: exactly the proposer's finding


def test_a_reboot_on_a_node_finding_is_found_by_the_voter() -> None:
    """The disagreement this module ended: the executor reboots host.<node> while voters
    looked for host.<node> among node-keyed matches and rejected."""
    reboot = CATALOG["host.node.reboot"]
    nodes = [Target(kind="node", name=n) for n in ("worker-1", "worker-2")]
    target = action_target(reboot, reboot.params(), nodes[1], HOST)
    assert target == Target(kind="host", name="worker-2")
    assert finding_behind(reboot, reboot.params(), target, nodes) == nodes[1]


def test_no_finding_behind_a_target_the_voter_does_not_see() -> None:
    restart = CATALOG["host.unit.restart"]
    params = UnitParams(unit="kubelet.service")
    target = Target(kind="unit", name="kubelet.service", host="worker-9")
    assert finding_behind(restart, params, target, [Target(kind="node", name="worker-1")]) is None


class _Nodes:
    """The nodes domain, fixed: what the voter's own watch would show."""

    name = "nodes"
    provides: frozenset[Domain] = frozenset({"nodes"})

    def __init__(self, *nodes: NodeObs) -> None:
        self.nodes = nodes

    async def observe(self, now: datetime) -> Observed:
        return Observed({"nodes": self.nodes}, SourceStatus(ok=True, detail="fixed"))


async def test_a_voter_confirms_a_reboot_of_the_node_it_sees_not_ready(tmp_path: Path) -> None:
    """The voter's own path (``Voter._judge`` → ``core.vote.confirm``) on ``host.worker-2``: it
    approves naming worker-2, and rejects a reboot of a host whose node it sees Ready."""
    config = load(config_paths(REPO))
    _, voter = unconnected_bus(config, "alexa", observing=Observing(
        [_Nodes(node("worker-1"), node("worker-2", "Unknown"))], timeout=1, host="cp-1"))
    reboot = policy("node-reboot", {"kind": "node-condition", "condition": "Ready",
                                    "status": ["False", "Unknown"], "for": "0s"},
                    [{"action": "host.node.reboot"}])

    def proposal(host: str) -> Proposal:
        return Proposal(action="host.node.reboot", target=Target(kind="host", name=host),
                        policy="node-reboot", policy_digest="d", step=0, destructive=True,
                        quorum=QuorumRule(approvals=2, deadline=datetime.now(UTC)),
                        summary="s")

    now = datetime.now(UTC)
    cast = await voter._confirm(reboot, proposal("worker-2"), now)
    assert (cast.verdict, "worker-2" in cast.reason) == ("approve", True), cast.reason
    cast = await voter._confirm(reboot, proposal("worker-1"), now)
    assert cast.verdict == "reject", cast.reason
