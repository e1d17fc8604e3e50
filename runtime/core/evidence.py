"""Independent evidence: which paths a vote saw its finding by (docs/safety.md).

Five voters reading one API server's watch are one observation read five times. A
vote therefore names its evidence paths, and a policy's quorum may ask for several
distinct ones (``bus.quorum`` counts them):

- ``apiserver``: the voter's own watch of the API server;
- ``host``: the target node's own agent, reporting its kubelet and container runtime
  units and the kubelet's healthz in its signed heartbeat (``NodeReport``);
- ``network``: the voter's own TCP probe of the node's kubelet port;
- ``peer``: the presence on the bus of the agents on the target node.

Each detector sees by one path (``runtime.model.paths.PRIMARY``). A node found not Ready can be
corroborated by the other three: a dead kubelet shows in its host's own report, in a
refused or unanswered port, or in the silence of the host's agents. When the API
server says not Ready but the host's own agent says its kubelet is active and healthy,
the two disagree, and nothing destructive is approved on either's word.

Pure: the voter does the probe and reads the heartbeats; this decides what they show.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from bus.messages import EvidencePath, NodeReport
from runtime.model.durations import format_duration

HEALTHY = "ok"
"""The kubelet's healthz body when it is healthy."""


@dataclass(frozen=True)
class Voice:
    """An agent heard on the bus that reports on the target node (its host runs it)."""

    persona: str
    heard: datetime  # its last heartbeat
    report: NodeReport


@dataclass(frozen=True)
class Probe:
    """The voter's own TCP connect to the node's kubelet port."""

    address: str
    error: str | None  # None: it connected


@dataclass(frozen=True)
class Corroboration:
    """The paths beyond the detector's own that confirm the finding (each with what it
    saw), what was looked at and did not confirm it, and a disagreement, if any."""

    paths: Mapping[EvidencePath, str] = field(default_factory=dict)
    unconfirmed: Mapping[str, str] = field(default_factory=dict)
    disagreement: str | None = None

    def evidence(self) -> dict[str, object]:
        out: dict[str, object] = {"paths": dict(self.paths)}
        if self.unconfirmed:
            out["unconfirmed"] = dict(self.unconfirmed)
        if self.disagreement is not None:
            out["disagreement"] = self.disagreement
        return out


NONE = Corroboration()


def kubelet_trouble(report: NodeReport) -> str | None:
    """What in a node's own report says its kubelet is not working, or None when the
    report says it is active and healthy. A unit that is not installed says nothing."""
    troubles = [f"{unit} {state}" for unit, state in report.units.items()
                if state != "not-found" and not state.startswith("active")]
    if report.healthz != HEALTHY:
        troubles.append(f"healthz {report.healthz}")
    return ", ".join(troubles) or None


def corroborate(node: str, *, voices: Sequence[Voice], probe: Probe | None, now: datetime,
                fresh: timedelta, silent: timedelta) -> Corroboration:
    """What the host, network and peer paths say of ``node``, which the API server
    reports not Ready.

    A report older than ``fresh`` is not evidence; agents unheard for ``silent`` are.
    Any fresh report of a healthy kubelet is a disagreement, even if another agent on the
    host reports trouble: acting on a healthy node is the mistake this guards against.
    """
    paths: dict[EvidencePath, str] = {}
    unconfirmed: dict[str, str] = {}
    disagreement = None
    current = [v for v in voices if now - v.report.observed_at <= fresh]
    healthy = [v for v in current if kubelet_trouble(v.report) is None]
    if healthy:
        disagreement = "; ".join(
            f"{v.persona} on {node} reports its kubelet active and healthy "
            f"({_units(v.report)}, {_ago(now, v.report.observed_at)})" for v in healthy)
    elif current:
        paths["host"] = "; ".join(
            f"{v.persona} on {node}: {kubelet_trouble(v.report)} "
            f"({_ago(now, v.report.observed_at)})" for v in current)
    elif voices:
        unconfirmed["host"] = (f"no report newer than {format_duration(fresh)} from "
                               f"{_names(voices)} on {node}")
    else:
        unconfirmed["host"] = f"no agent heard from on {node}"
    if voices and all(now - v.heard >= silent for v in voices):
        paths["peer"] = (f"{_names(voices)} on {node} silent for "
                         f"{_seconds(now - max(v.heard for v in voices))}")
    elif voices:
        unconfirmed["peer"] = f"{_names(v for v in voices if now - v.heard < silent)} heard"
    if probe is None:
        unconfirmed["network"] = f"{node} reports no InternalIP and kubelet port to probe"
    elif probe.error is not None:
        paths["network"] = f"kubelet port {probe.address}: {probe.error}"
    else:
        unconfirmed["network"] = f"kubelet port {probe.address} accepts connections"
    return Corroboration(paths, unconfirmed, disagreement)


def _units(report: NodeReport) -> str:
    states = [f"{unit} {state}" for unit, state in report.units.items()]
    return ", ".join([*states, f"healthz {report.healthz}"])


def _ago(now: datetime, at: datetime) -> str:
    return f"{_seconds(now - at)} ago"


def _seconds(length: timedelta) -> str:
    return format_duration(timedelta(seconds=max(round(length.total_seconds()), 0)))


def _names(voices: Iterable[Voice]) -> str:
    return ", ".join(sorted({v.persona for v in voices}))
