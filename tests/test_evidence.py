"""Independent evidence: paths named by votes, counted by the tally, corroborated by the host,
the network and the bus, and a disagreement that stops a destructive repair."""

from __future__ import annotations

import asyncio
import typing
from datetime import timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bus.messages import (
    EVIDENCE_PATHS,
    EvidencePath,
    EvidenceRule,
    NodeReport,
    QuorumRule,
    Required,
)
from bus.quorum import Ballot, Rule, looser, strictest, tally
from runtime.core import evidence
from runtime.core.evidence import Corroboration, Probe, Voice, corroborate
from runtime.core.vote import Vote, corroborated
from runtime.host.observing import KubeletObserver, healthz_answer, tcp_connect
from runtime.host.systemctl import Systemctl, SystemctlError
from runtime.kube.observing import node_obs
from runtime.model import paths as evidence_paths
from runtime.model.formats import Detect, HostEvidence, NodeConditionDetect
from runtime.model.snapshot import UnitObs
from tests.builders import T0, at
from tests.healthz import Kubelet

ELIGIBLE = frozenset({"otto", "alexa", "riven", "vera", "lior"})
TWO = EvidenceRule(distinct=2)


def rule(evidence_rule: EvidenceRule = TWO, approvals: int = 3,
         proposer_paths: frozenset[EvidencePath] = frozenset({"apiserver"})) -> Rule:
    return Rule("otto", approvals, frozenset({"riven"}), at(30), evidence_rule, proposer_paths)


def approve(voter: str, *paths: EvidencePath, seconds: float = 1) -> Ballot:
    return Ballot(f"v-{voter}", voter, "approve", at(seconds), frozenset(paths))


# ---------------------------------------------------------------- the tally


def test_approvals_that_only_repeat_the_api_servers_word_add_no_path() -> None:
    votes = [approve("alexa", "apiserver"), approve("riven", "apiserver"),
             approve("vera", "apiserver")]
    waiting = tally(rule(), votes, ELIGIBLE, at(5))
    assert waiting.outcome == "pending"
    assert waiting.approvals == ("otto", "alexa", "riven", "vera")
    assert "1/2 distinct evidence paths (named: apiserver)" in waiting.reason
    late = tally(rule(), votes, ELIGIBLE, at(31))
    assert late.outcome == "expired"
    assert late.reason == ("deadline passed: 1/2 distinct evidence paths (named: apiserver)")


def test_one_approval_by_a_second_path_completes_the_evidence() -> None:
    votes = [approve("alexa", "apiserver"), approve("riven", "apiserver", "network")]
    result = tally(rule(), votes, ELIGIBLE, at(2))
    assert result.outcome == "approved"
    assert result.paths == ("apiserver", "network")
    assert result.reason == "3/3 approvals, no veto, evidence by apiserver, network"


def test_the_proposers_path_counts_and_a_rejection_names_none() -> None:
    votes = [approve("alexa", "network"), approve("riven", "network"),
             Ballot("v-vera", "vera", "reject", at(1), frozenset({"host"}))]
    result = tally(rule(EvidenceRule(distinct=3)), votes, ELIGIBLE, at(2))
    assert result.outcome == "pending"
    assert result.paths == ("apiserver", "network")  # otto's, theirs; not vera's host
    assert rule().paths == {"apiserver"}


def test_a_required_path_must_be_named_by_someone() -> None:
    needs_host = EvidenceRule(distinct=2, requires=("host",))
    votes = [approve("alexa", "network"), approve("riven", "network")]
    waiting = tally(rule(needs_host), votes, ELIGIBLE, at(2))
    assert waiting.outcome == "pending"
    assert "no approval by the host evidence path (named: apiserver, network)" in waiting.reason
    votes.append(approve("vera", "host"))
    assert tally(rule(needs_host), votes, ELIGIBLE, at(3)).outcome == "approved"


def test_rejected_once_everyone_voted_and_the_paths_still_fall_short() -> None:
    votes = [approve(name, "apiserver") for name in ("alexa", "riven", "vera", "lior")]
    result = tally(rule(), votes, ELIGIBLE, at(2))
    assert result.outcome == "rejected"
    assert result.reason == ("5 approvals, but 1/2 distinct evidence paths (named: apiserver)")


def test_a_rule_without_evidence_needs_no_paths_at_all() -> None:
    votes = [approve("alexa"), approve("riven")]
    result = tally(rule(EvidenceRule(), proposer_paths=frozenset()), votes, ELIGIBLE, at(2))
    assert result.outcome == "approved"
    assert result.reason == "3/3 approvals, no veto"


paths = st.frozensets(st.sampled_from(EVIDENCE_PATHS))


@given(st.lists(st.tuples(st.sampled_from(sorted(ELIGIBLE - {"otto"})),
                          st.sampled_from(["approve", "reject", "block"]), paths), max_size=8),
       paths, st.integers(1, 4), st.frozensets(st.sampled_from(EVIDENCE_PATHS), max_size=2),
       st.integers(0, 40))
def test_an_approval_always_has_its_distinct_paths(
        votes: list[tuple[str, typing.Any, frozenset[EvidencePath]]],
        proposer: frozenset[EvidencePath], distinct: int, requires: frozenset[EvidencePath],
        now: int) -> None:
    wanted = EvidenceRule(distinct=max(distinct, len(requires)), requires=tuple(sorted(requires)))
    ballots = [Ballot(f"v{i}", voter, verdict, at(i % 30), named)
               for i, (voter, verdict, named) in enumerate(votes)]
    result = tally(rule(wanted, approvals=2, proposer_paths=proposer), ballots, ELIGIBLE,
                   at(now))
    if result.outcome != "approved" or not wanted.needed:
        return
    first: dict[str, Ballot] = {}
    for b in sorted(ballots, key=lambda b: (b.at, b.vote_id)):
        first.setdefault(b.voter, b)
    named = proposer.union(*(b.paths for b in first.values() if b.verdict == "approve"))
    assert len(named) >= wanted.distinct
    assert set(requires) <= named


def test_a_rule_asking_fewer_paths_than_the_policy_is_looser() -> None:
    demanded = Required(approvals=3, veto=("riven",), deadline=30, destructive=True,
                        evidence=EvidenceRule(distinct=2, requires=("host",)))
    weak = QuorumRule(approvals=3, veto=("riven",), deadline=at(30))
    assert looser(weak, True, T0, demanded) == [
        "asks 1 distinct evidence paths, the policy 2",
        "drops the required evidence path host"]
    strong = weak.model_copy(update={"evidence": EvidenceRule(distinct=3, requires=("host",))})
    assert looser(strong, True, T0, demanded) == []


def test_the_strictest_terms_take_every_required_path() -> None:
    a = Required(approvals=2, deadline=30, destructive=True,
                 evidence=EvidenceRule(distinct=1, requires=("host",)))
    b = Required(approvals=2, deadline=30, destructive=True,
                 evidence=EvidenceRule(distinct=1, requires=("network",)))
    both = strictest([a, b])
    assert both is not None
    assert both.evidence == EvidenceRule(distinct=2, requires=("host", "network"))


def test_an_evidence_rule_must_be_reachable() -> None:
    with pytest.raises(ValueError, match="distinct 1 is fewer than the 2 paths it requires"):
        EvidenceRule(distinct=1, requires=("host", "network"))
    with pytest.raises(ValueError, match="requires names a path twice"):
        EvidenceRule(distinct=2, requires=("host", "host"))


# ---------------------------------------------------------------- what the paths say


def report(healthz: str = "ok", kubelet: str = "active/running", seconds: float = 0,
           node: str = "worker-1") -> NodeReport:
    return NodeReport(node=node, observed_at=at(seconds), healthz=healthz,
                      units={"kubelet.service": kubelet, "containerd.service": "active/running"})


FRESH, SILENT = timedelta(seconds=40), timedelta(seconds=30)


def looked(voices: list[Voice], probe: Probe | None = None, now: float = 10) -> Corroboration:
    return corroborate("worker-1", voices=voices, probe=probe, now=at(now), fresh=FRESH,
                       silent=SILENT)


def test_a_healthy_report_from_the_nodes_own_agent_is_a_disagreement() -> None:
    found = looked([Voice("alexa", at(8), report(seconds=7))],
                   Probe("127.0.0.1:10250", "Connection refused"))
    assert found.disagreement == (
        "alexa on worker-1 reports its kubelet active and healthy (kubelet.service "
        "active/running, containerd.service active/running, healthz ok, 3s ago)")
    assert found.paths == {"network": "kubelet port 127.0.0.1:10250: Connection refused"}


def test_a_failed_kubelet_in_the_report_confirms_by_the_host_path() -> None:
    found = looked([Voice("alexa", at(8), report("Connection refused", "failed/failed", 7))],
                   Probe("127.0.0.1:10250", None))
    assert found.disagreement is None
    assert found.paths == {"host": "alexa on worker-1: kubelet.service failed/failed, "
                                   "healthz Connection refused (3s ago)"}
    assert found.unconfirmed == {"peer": "alexa heard",
                                 "network": "kubelet port 127.0.0.1:10250 accepts connections"}


def test_a_unit_not_installed_says_nothing_but_a_failing_healthz_does() -> None:
    assert evidence.kubelet_trouble(report(kubelet="not-found")) is None
    assert evidence.kubelet_trouble(report("HTTP 500: [-]syncloop failed")) == (
        "healthz HTTP 500: [-]syncloop failed")


def test_a_stale_report_is_no_evidence_and_silent_agents_are_the_peer_path() -> None:
    found = looked([Voice("alexa", at(0), report(seconds=0))], now=45)
    assert found.disagreement is None  # healthy, but 45s old: the host may have died since
    assert found.paths == {"peer": "alexa on worker-1 silent for 45s"}
    assert found.unconfirmed == {
        "host": "no report newer than 40s from alexa on worker-1",
        "network": "worker-1 reports no InternalIP and kubelet port to probe"}


def test_no_agent_on_the_node_leaves_the_network_path_to_stand_in() -> None:
    found = looked([], Probe("10.0.0.21:10250", "timed out after 2s"))
    assert found.paths == {"network": "kubelet port 10.0.0.21:10250: timed out after 2s"}
    assert found.unconfirmed == {"host": "no agent heard from on worker-1"}


def test_one_healthy_report_outweighs_another_agents_trouble() -> None:
    found = looked([Voice("alexa", at(9), report(seconds=9)),
                    Voice("lior", at(9), report("Connection refused", "failed/failed", 9))])
    assert found.disagreement is not None
    assert "alexa" in found.disagreement
    assert "host" not in found.paths


def test_only_a_ready_condition_can_be_corroborated_by_the_kubelets_paths() -> None:
    def detect(**fields: typing.Any) -> Detect:
        return NodeConditionDetect.model_validate({"kind": "node-condition", **fields})

    assert evidence_paths.corroborates_kubelet(detect())
    assert not evidence_paths.corroborates_kubelet(detect(condition="DiskPressure",
                                                          status=["True"]))
    assert not evidence_paths.corroborates_kubelet(detect(status=["True"]))


def test_every_detector_kind_names_its_own_path() -> None:
    kinds = {typing.get_args(c.model_fields["kind"].annotation)[0]
             for c in typing.get_args(typing.get_args(Detect)[0])}
    assert kinds == set(evidence_paths.PRIMARY)


def test_the_vote_takes_the_paths_or_turns_into_a_reject_on_disagreement() -> None:
    approval = Vote("approve", "confirmed from cp-2: node worker-1 Ready=Unknown",
                    {"host": "cp-2"}, paths=("apiserver",))
    more = corroborated(approval, "worker-1", Corroboration(
        {"network": "kubelet port 127.0.0.1:1: Connection refused"}))
    assert more.verdict == "approve"
    assert more.paths == ("apiserver", "network")
    assert more.evidence["paths"] == {"network": "kubelet port 127.0.0.1:1: Connection refused"}
    against = corroborated(approval, "worker-1", Corroboration(
        {"network": "refused"}, disagreement="alexa on worker-1 reports its kubelet active"))
    assert against.verdict == "reject"
    assert against.paths == ()
    assert against.reason == ("disagreement: the API server says worker-1 is not Ready, but "
                              "alexa on worker-1 reports its kubelet active")
    assert against.evidence["disagreement"] == "alexa on worker-1 reports its kubelet active"


# ---------------------------------------------------------------- observing them


def test_the_node_observer_reads_its_internal_ip_and_kubelet_port() -> None:
    obj = {"metadata": {"name": "w1"}, "status": {
        "addresses": [{"type": "Hostname", "address": "w1"},
                      {"type": "InternalIP", "address": "10.0.0.21"}],
        "daemonEndpoints": {"kubeletEndpoint": {"Port": 10250}}}}
    seen = node_obs(obj)
    assert (seen.address, seen.kubelet_port) == ("10.0.0.21", 10250)
    odd = node_obs({"metadata": {"name": "w1"}, "status": {
        "daemonEndpoints": {"kubeletEndpoint": {"Port": "10250"}}}})
    assert (odd.address, odd.kubelet_port) == ("", None)


def test_healthz_answers() -> None:
    assert healthz_answer(b"HTTP/1.1 200 OK\r\n", b"ok") == "ok"
    assert healthz_answer(b"HTTP/1.1 500 Internal Server Error\r\n",
                          b"[-]syncloop failed\n") == "HTTP 500: [-]syncloop failed"
    assert healthz_answer(b"", b"") == "connection closed without a response"
    assert healthz_answer(b"SSH-2.0-OpenSSH\r\n", b"") == (
        "no HTTP response: b'SSH-2.0-OpenSSH\\r\\n'")


class Units(Systemctl):
    """systemd as a test sets it: ``states`` by unit, or no systemd at all."""

    def __init__(self, states: dict[str, str] | None) -> None:
        self.states = states

    async def show_units(self, units: typing.Sequence[str], *,
                         within: float) -> tuple[UnitObs, ...]:
        if self.states is None:
            raise SystemctlError(["systemctl", "show"], "System has not been booted with systemd")
        return tuple(UnitObs(name=u, load_state="not-found", active_state="inactive")
                if self.states.get(u) is None else
                UnitObs(name=u, active_state=self.states[u].split("/")[0],
                        sub_state=self.states[u].split("/")[1]) for u in units)


def observe(url: str, states: dict[str, str] | None, *,
            explicit: bool = False) -> NodeReport | None:
    observer = KubeletObserver("worker-1", HostEvidence(kubeletHealthz=url), explicit=explicit,
                               systemctl=Units(states))
    return asyncio.run(observer.observe(T0)).data.get("node_report")


def test_the_kubelet_observer_reports_units_and_healthz_of_a_real_http_server(
        healthz: str) -> None:
    seen = observe(healthz, {"kubelet.service": "active/running",
                             "containerd.service": "active/running"})
    assert seen == NodeReport(node="worker-1", observed_at=T0, healthz="ok", units={
        "kubelet.service": "active/running", "containerd.service": "active/running"})
    Kubelet.answer = (500, b"[-]syncloop failed")
    sick = observe(healthz, {"kubelet.service": "active/running"})
    assert sick is not None
    assert sick.healthz == "HTTP 500: [-]syncloop failed"
    assert sick.units == {"kubelet.service": "active/running", "containerd.service": "not-found"}


def test_a_host_without_a_kubelet_reports_nothing_unless_told_its_node(healthz: str) -> None:
    closed = healthz.rsplit(":", 1)[0] + ":1/healthz"
    assert observe(closed, {}) is None
    assert observe(closed, None) is None  # no systemd either
    told = observe(closed, None, explicit=True)
    assert told is not None
    assert (told.healthz, told.units) == ("Connection refused", {})
    assert observe(healthz, None) is not None  # healthz answers: a kubelet runs here


def test_the_tcp_probe_says_why_it_failed() -> None:
    assert asyncio.run(tcp_connect("127.0.0.1", 1, 1.0)) == "Connection refused"
