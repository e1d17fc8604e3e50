"""Which evidence paths can speak to a finding: known from the policy alone.

The voters gather the evidence (``runtime.core.evidence``); the loader needs the same
knowledge to refuse a quorum whose evidence rule no voter could ever meet.
"""

from __future__ import annotations

from collections.abc import Mapping

from bus.messages import EVIDENCE_PATHS, EvidencePath
from runtime.model.formats import Detect, NodeConditionDetect

PRIMARY: Mapping[str, EvidencePath] = {
    "node-condition": "apiserver",
    "pod-crashloop": "apiserver",
    "cordon-without-owner": "apiserver",
    "apiserver-unreachable": "network",  # the agent's own probes of the API server's ports
    "unit-failed": "host",  # systemd on the unit's own host
    "peer-silent": "peer",
    "stale-lease": "peer",  # the lease bucket and its holder's presence on the bus
}
"""The path each detector kind observes by."""


def corroborates_kubelet(detect: Detect) -> bool:
    """Whether a finding of ``detect`` means "this node's kubelet is not working", which
    the host, network and peer paths can speak to (a node not Ready; not, say, a node
    under disk pressure, which only the API server reports)."""
    return (isinstance(detect, NodeConditionDetect) and detect.condition == "Ready"
            and "True" not in detect.status)


def providable(detect: Detect) -> frozenset[EvidencePath]:
    """Every path some voter could name for a finding of ``detect``."""
    if corroborates_kubelet(detect):
        return frozenset(EVIDENCE_PATHS)
    return frozenset({PRIMARY[detect.kind]})
