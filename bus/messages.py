"""The body of each message kind (docs/bus.md; JSON Schemas in docs/schemas/).

These models are the wire contract: field names are what ``nats sub 'zeta.>'``
shows, so they are spelled for people reading JSON, not for Python.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

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


class Heartbeat(Wire):
    pid: int = Field(ge=0)
    version: Short
    tick: int = Field(ge=0)
    status: Text = Field(description="The same one-line summary systemd shows.")
    bus: Literal["connected", "disconnected"]
    kubernetes: Text = Field(description="'observed', 'unreachable: …' or 'not observed'.")
    frozen: bool = False
    scopes_digest: Short
    policies_digest: Short


class Finding(Wire):
    state: Literal["opened", "cleared"]
    policy: Short
    target: Target
    since: Time
    summary: Text
    evidence: dict[str, Any] = Field(default_factory=dict)


class QuorumRule(Wire):
    approvals: int = Field(ge=1, le=32)
    veto: tuple[Name, ...] = Field(default=(), max_length=32)
    deadline: Time


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


Verdict = Literal["approve", "reject", "block"]


class Vote(Wire):
    verdict: Verdict
    reason: Text = Field(min_length=1)
    evidence: dict[str, Any] = Field(default_factory=dict)
    observed_at: Time
    policy_digest: Short
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
    verb: Literal["freeze", "thaw", "breaker-reset"]
    reason: Text = Field(min_length=1)
    policy: Short | None = None


BODIES: dict[str, type[Wire]] = {
    "heartbeat": Heartbeat, "finding": Finding, "proposal": Proposal, "vote": Vote,
    "decision": Decision, "started": Started, "result": Result, "control": Control,
}
