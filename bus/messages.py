"""The body of each message kind (docs/bus.md; JSON Schemas in docs/schemas/).

These models are the wire contract: field names are what ``nats sub 'zeta.>'``
shows, so they are spelled for people reading JSON, not for Python.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

Kind = Literal["heartbeat", "finding", "proposal", "vote", "decision", "started", "result",
               "control"]

TargetKind = Literal["node", "pod", "deployment", "statefulset", "daemonset", "unit", "host",
                     "persona", "lease", "apiserver", "humans"]


class Wire(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Target(Wire):
    """What an action acts on. ``key`` names it uniquely: the lease key on the bus."""

    kind: TargetKind
    name: str = Field(min_length=1, max_length=253)
    namespace: str | None = None
    host: str | None = Field(default=None, description="For units: the host they run on.")

    @property
    def key(self) -> str:
        """``node.worker-1``, ``pod.default/web-0``, ``unit.cp-1/kubelet.service``.

        A unit is only unique per host: kubelet.service on two hosts are two targets,
        and a repair on one must not hold the lease of the other.
        """
        scope = self.namespace if self.namespace else self.host if self.kind == "unit" else None
        return f"{self.kind}.{scope}/{self.name}" if scope else f"{self.kind}.{self.name}"


class Heartbeat(Wire):
    pid: int
    version: str
    tick: int
    status: str = Field(description="The same one-line summary systemd shows.")
    bus: Literal["connected", "disconnected"]
    kubernetes: str = Field(description="'observed', 'unreachable: …' or 'not observed'.")
    frozen: bool = False
    scopes_digest: str
    policies_digest: str


class Finding(Wire):
    state: Literal["opened", "cleared"]
    policy: str
    target: Target
    since: datetime
    summary: str
    evidence: dict[str, Any] = Field(default_factory=dict)


class QuorumRule(Wire):
    approvals: int = Field(ge=1)
    veto: tuple[str, ...] = ()
    deadline: datetime


class Proposal(Wire):
    action: str
    target: Target
    params: dict[str, Any] = Field(default_factory=dict)
    policy: str
    policy_digest: str
    step: int = Field(ge=0)
    destructive: bool
    quorum: QuorumRule
    summary: str
    evidence: dict[str, Any] = Field(default_factory=dict)
    rationale: str = ""


Verdict = Literal["approve", "reject", "block"]


class Vote(Wire):
    verdict: Verdict
    reason: str = Field(min_length=1)
    evidence: dict[str, Any] = Field(default_factory=dict)
    observed_at: datetime
    policy_digest: str
    rationale: str = Field(
        default="", max_length=2000,
        description="A voter's argued case in its own words (model-written when it runs a "
                    "model brain); the verdict never depends on it.")


class Decision(Wire):
    outcome: Literal["approved", "rejected", "expired"]
    reason: str
    approvals: tuple[str, ...] = ()
    rejections: tuple[str, ...] = ()
    vetoes: tuple[str, ...] = ()
    votes: tuple[str, ...] = Field(default=(), description="Ids of the vote messages counted.")


class Started(Wire):
    executor: str
    lease: str
    fencing_token: int = Field(ge=1)


class Result(Wire):
    """What came of a repair. Carries the action and target itself, so that a repair
    that needed no quorum (and so has no proposal) is still readable on its own."""

    outcome: Literal["succeeded", "failed", "verified", "unverified", "compensated", "refused"]
    detail: str
    action: str
    target: Target
    policy: str
    observed: dict[str, Any] = Field(default_factory=dict)
    dry_run: bool = False


class Control(Wire):
    verb: Literal["freeze", "thaw", "breaker-reset"]
    reason: str = Field(min_length=1)
    policy: str | None = None


BODIES: dict[str, type[Wire]] = {
    "heartbeat": Heartbeat, "finding": Finding, "proposal": Proposal, "vote": Vote,
    "decision": Decision, "started": Started, "result": Result, "control": Control,
}
