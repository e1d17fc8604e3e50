"""The body of each message kind (docs/bus.md; JSON Schemas in docs/schemas/).

These models are the wire contract: field names are what ``nats sub 'zeta.>'``
shows, so they are spelled for people reading JSON, not for Python.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Self, get_args

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, model_validator

from bus.subjects import PERSONA_NAME

Kind = Literal["heartbeat", "finding", "proposal", "vote", "decision", "started", "result",
               "control"]

TargetKind = Literal["node", "pod", "deployment", "statefulset", "daemonset", "unit", "host",
                     "persona", "lease", "apiserver", "humans"]


# Every field a peer fills is bounded here, at the edge: a peer's message must not be
# able to raise inside a tick or a tally (a naive timestamp compared with an aware one
# does), nor make an agent keep or print an unbounded string.
Time = AwareDatetime
Name = Annotated[str, Field(pattern=PERSONA_NAME.pattern)]
Short = Annotated[str, Field(max_length=253)]
TEXT_MAX = 4000
Text = Annotated[str, Field(max_length=TEXT_MAX)]


class Wire(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Target(Wire):
    """What an action acts on. ``key`` names it uniquely: the lease key on the bus."""

    kind: TargetKind
    name: str = Field(min_length=1, max_length=253)
    namespace: Short | None = None
    host: Short | None = Field(default=None, description="For units: the host they run on.")

    @property
    def key(self) -> str:
        """``node.worker-1``, ``pod.default/web-0``, ``unit.cp-1/kubelet.service``.

        A unit is only unique per host: kubelet.service on two hosts are two targets,
        and a repair on one must not hold the lease of the other.
        """
        scope = self.namespace if self.namespace else self.host if self.kind == "unit" else None
        return f"{self.kind}.{scope}/{self.name}" if scope else f"{self.kind}.{self.name}"


EvidencePath = Literal["apiserver", "host", "network", "peer"]
"""How a vote saw what it vouches for (docs/safety.md#independent-evidence): its own watch
of the API server; the target host's own agent, in its signed heartbeat; its own probe
of the target over the network; the presence of the target host's agents on the bus."""
EVIDENCE_PATHS: tuple[EvidencePath, ...] = get_args(EvidencePath)


class NodeReport(Wire):
    """What an agent on a Kubernetes node says of its own kubelet, in its heartbeat: the
    ``host`` evidence path for votes on that node."""

    node: Short = Field(min_length=1, description="The Node this host runs ($ZETA_NODE_NAME, "
                                                  "else the host name).")
    observed_at: Time
    units: dict[Short, Short] = Field(
        default_factory=dict, max_length=8,
        description="systemd unit -> 'active/running', 'failed/failed', 'not-found', …")
    healthz: Short = Field(description="The kubelet's own healthz answer: 'ok', or why not.")


class Heartbeat(Wire):
    pid: int = Field(ge=0)
    version: Short
    tick: int = Field(ge=0)
    status: Text = Field(description="The same one-line summary systemd shows.")
    bus: Literal["connected", "disconnected"]
    kubernetes: Text = Field(description="'observed', 'unreachable: …' or 'not observed'.")
    frozen: bool = False
    paused: tuple[Short, ...] = Field(
        default=(), max_length=64,
        description="The pauses in force: policy names, `*` for every policy.")
    scopes_digest: Short
    policies_digest: Short
    node: NodeReport | None = Field(
        default=None, description="Present on an agent whose host runs a kubelet.")


class Finding(Wire):
    state: Literal["opened", "cleared"]
    policy: Short
    target: Target
    since: Time
    summary: Text
    evidence: dict[str, Any] = Field(default_factory=dict)


class EvidenceRule(Wire):
    """How independent the approvals must be: the evidence paths they name between
    them (the proposer's included) must be ``distinct`` many and include ``requires``."""

    distinct: int = Field(default=1, ge=1, le=len(EVIDENCE_PATHS))
    requires: tuple[EvidencePath, ...] = Field(default=(), max_length=len(EVIDENCE_PATHS))

    @model_validator(mode="after")
    def _reachable(self) -> Self:
        if len(set(self.requires)) != len(self.requires):
            raise ValueError("requires names a path twice")
        if len(self.requires) > self.distinct:
            raise ValueError(f"distinct {self.distinct} is fewer than the "
                             f"{len(self.requires)} paths it requires")
        return self

    @property
    def needed(self) -> bool:
        return self.distinct > 1 or bool(self.requires)

    def short(self) -> str:
        """``2 distinct paths incl. host``."""
        also = f" incl. {', '.join(self.requires)}" if self.requires else ""
        return f"{self.distinct} distinct path{'s' if self.distinct > 1 else ''}{also}"


NO_EVIDENCE_RULE = EvidenceRule()


class QuorumRule(Wire):
    approvals: int = Field(ge=1, le=32)
    veto: tuple[Name, ...] = Field(default=(), max_length=32)
    deadline: Time
    evidence: EvidenceRule = NO_EVIDENCE_RULE


class Required(Wire):
    """The quorum a voter's own copy of the policy demands for a step.

    Recorded in every vote on a known policy, so that ``audit verify`` can check the
    proposal's rule against the policy at that digest long after the policy changed:
    the proposer writes the rule, the voters (other keys) write what it had to be.
    """

    approvals: int = Field(ge=1, le=32)
    veto: tuple[Name, ...] = Field(default=(), max_length=32)
    deadline: float = Field(gt=0, description="The longest deadline allowed, in seconds "
                                                "after the proposal was sent.")
    destructive: bool
    evidence: EvidenceRule = NO_EVIDENCE_RULE


Paths = Annotated[tuple[EvidencePath, ...], Field(max_length=len(EVIDENCE_PATHS))]


class Proposal(Wire):
    action: Short
    target: Target
    params: dict[str, Any] = Field(default_factory=dict)
    policy: Short
    policy_digest: Short
    step: int = Field(ge=0, le=1000)
    destructive: bool
    quorum: QuorumRule
    summary: Text
    evidence: dict[str, Any] = Field(default_factory=dict)
    rationale: Text = ""
    paths: Paths = Field(default=(), description="The evidence paths the proposer saw it by.")


Verdict = Literal["approve", "reject", "block"]


class Vote(Wire):
    verdict: Verdict
    reason: Text = Field(min_length=1)
    evidence: dict[str, Any] = Field(default_factory=dict)
    observed_at: Time
    policy_digest: Short
    paths: Paths = Field(default=(), description="The evidence paths that confirmed what an "
                                                 "approval vouches for.")
    required: Required | None = Field(
        default=None, description="The quorum the voter's copy of the policy demands "
                                  "(absent when it has no such policy or step).")
    rationale: str = Field(
        default="", max_length=2000,
        description="A voter's argued case in its own words (model-written when it runs a "
                    "model brain); the verdict never depends on it.")


class Decision(Wire):
    outcome: Literal["approved", "rejected", "expired"]
    reason: Text
    approvals: tuple[Name, ...] = Field(default=(), max_length=64)
    rejections: tuple[Name, ...] = Field(default=(), max_length=64)
    vetoes: tuple[Name, ...] = Field(default=(), max_length=64)
    votes: tuple[Short, ...] = Field(default=(), max_length=64,
                                     description="Ids of the vote messages counted.")


class Started(Wire):
    executor: Name
    lease: Short
    fencing_token: int = Field(ge=1)


class Result(Wire):
    """What came of a repair. Carries the action and target itself, so that a repair
    that needed no quorum (and so has no proposal) is still readable on its own."""

    outcome: Literal["succeeded", "failed", "verified", "unverified", "compensated", "refused"]
    detail: Text
    action: Short
    target: Target
    policy: Short
    observed: dict[str, Any] = Field(default_factory=dict)
    dry_run: bool = False


class Control(Wire):
    verb: Literal["freeze", "thaw", "breaker-reset", "pause", "resume"]
    reason: Text = Field(min_length=1)
    policy: Short | None = Field(
        default=None, description="breaker-reset: the policy; pause and resume: the policy "
                                  "they hold or release (none: every policy).")
    until: Time | None = Field(
        default=None, description="pause: when it lapses by itself (required).")

    @model_validator(mode="after")
    def _until_for_pause(self) -> Self:
        if (self.verb == "pause") != (self.until is not None):
            raise ValueError("a pause, and only a pause, has an `until`")
        return self


BODIES: dict[str, type[Wire]] = {
    "heartbeat": Heartbeat, "finding": Finding, "proposal": Proposal, "vote": Vote,
    "decision": Decision, "started": Started, "result": Result, "control": Control,
}
