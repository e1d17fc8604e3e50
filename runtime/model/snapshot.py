"""What the agent sees, as typed data: the input of every detector.

One ``Snapshot`` per tick. A domain that was not observed (no Kubernetes observer
yet, or the host probe failed) is ``None``, never an empty list: detectors must not
read "I could not look" as "there is nothing wrong". The same JSON is the format of
recorded incidents (docs/incidents.md).
"""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field

from bus.messages import NodeReport, Target
from runtime.model.formats import Selector


class Obs(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Resources(Obs):
    """CPU and memory, as the scheduler counts them (requests, allocatable)."""

    cpu_millis: int = 0
    memory_bytes: int = 0

    def __add__(self, other: Resources) -> Resources:
        return Resources(cpu_millis=self.cpu_millis + other.cpu_millis,
                         memory_bytes=self.memory_bytes + other.memory_bytes)

    def __sub__(self, other: Resources) -> Resources:
        return Resources(cpu_millis=self.cpu_millis - other.cpu_millis,
                         memory_bytes=self.memory_bytes - other.memory_bytes)


NO_RESOURCES = Resources()


class NodeCondition(Obs):
    type: str
    status: str
    reason: str = ""
    since: datetime | None = None


class NodeObs(Obs):
    name: str
    address: str = Field(default="", description="Its InternalIP, as its kubelet reports it.")
    kubelet_port: int | None = Field(
        default=None, description="daemonEndpoints.kubeletEndpoint.Port (None: not reported).")
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)
    unschedulable: bool = False
    conditions: tuple[NodeCondition, ...] = ()
    heartbeat: datetime | None = Field(
        default=None, description="When the kubelet last renewed the node's Lease in "
                                  "kube-node-lease: evidence of a live kubelet, or of its silence.")
    allocatable: Resources | None = Field(
        default=None, description="What the scheduler may place on the node (None: not reported).")

    def condition(self, kind: str) -> NodeCondition | None:
        return next((c for c in self.conditions if c.type == kind), None)


class ContainerObs(Obs):
    name: str
    restarts: int = 0
    ready: bool = False
    waiting_reason: str = ""


class PodObs(Obs):
    namespace: str
    name: str
    node: str | None = None
    phase: str = "Pending"
    owner: Target | None = Field(default=None, description="The top-level workload, if any.")
    labels: dict[str, str] = Field(default_factory=dict)
    containers: tuple[ContainerObs, ...] = ()
    ready: bool | None = Field(
        default=None, description="Its Ready condition (None: not reported). The node "
                                  "controller sets it False on a node gone NotReady, while "
                                  "its containers' last statuses still say ready.")
    requests: Resources = Field(
        default=NO_RESOURCES, description="The sum of its containers' requests (the "
                                          "larger of that and any init container's).")


class BudgetObs(Obs):
    """A PodDisruptionBudget, as the Eviction API will judge an eviction by it."""

    namespace: str
    name: str
    selector: Selector | None = Field(
        default=None, description="None: it selects no pod (a null selector in policy/v1).")
    disruptions_allowed: int = 0
    current_healthy: int = 0
    desired_healthy: int = 0
    always_allow_unhealthy: bool = Field(
        default=False, description="unhealthyPodEvictionPolicy: AlwaysAllow.")
    current: bool = Field(
        default=True, description="Its status has caught up with its spec (observedGeneration); "
                                  "until then the Eviction API refuses every eviction it covers.")

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


class ApiProbe(Obs):
    """One attempt to reach the API server along one path (TCP, /readyz, kubelet view…)."""

    path: str
    ok: bool
    error: str = ""


class UnitObs(Obs):
    """A systemd unit on this host (names as in ``systemctl show``)."""

    name: str
    load_state: str = "loaded"  # "not-found": the unit does not exist here, so it cannot be failed
    active_state: str
    sub_state: str = ""
    n_restarts: int = 0


class PeerObs(Obs):
    persona: str
    last_heartbeat: datetime | None = None
    host: str = ""
    node: NodeReport | None = Field(
        default=None, description="The last report on its node's kubelet it sent, if any.")


class LeaseObs(Obs):
    key: str
    repair: str
    holder: str
    expires: datetime


class HostHealth(Obs):
    disk_free_fraction: float | None = None
    memory_available_fraction: float | None = None
    memory_pressure_some_avg10: float | None = None


class EventObs(Obs):
    """A Warning event the API server still holds (it keeps events for an hour by default)."""

    namespace: str = ""
    object: str = Field(description="The object it is about, as Kind/name (e.g. Node/w1).")
    reason: str = ""
    message: str = Field(default="", description="Cut to a few hundred characters: it is "
                                                 "evidence, written by whoever could post it.")
    count: int = 1
    last_seen: datetime | None = None

    def line(self) -> str:
        """One line of evidence: ``Reason: message (xN)``."""
        times = f" (x{self.count})" if self.count > 1 else ""
        return f"{self.reason}: {self.message}{times}"


class SourceStatus(Obs):
    """How an observer fared this tick: the evidence of what was and was not seen."""

    ok: bool
    detail: str = ""


class Snapshot(Obs):
    at: datetime
    host: str = ""
    nodes: tuple[NodeObs, ...] | None = None
    pods: tuple[PodObs, ...] | None = None
    apiserver: tuple[ApiProbe, ...] | None = None
    units: tuple[UnitObs, ...] | None = None
    peers: tuple[PeerObs, ...] | None = None
    leases: tuple[LeaseObs, ...] | None = None
    health: HostHealth | None = None
    events: tuple[EventObs, ...] | None = None
    budgets: tuple[BudgetObs, ...] | None = None
    node_report: NodeReport | None = Field(
        default=None, description="This host's own kubelet, if it runs one (its heartbeat's).")
    sources: dict[str, SourceStatus] = Field(default_factory=dict)
