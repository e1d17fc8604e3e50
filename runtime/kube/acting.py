"""Kubernetes actuators: cordon, uncordon, drain, delete a pod, restart a workload.

Every change goes through ``Session.change``, the only way an actuator can write: first
a server-side dry run (``dryRun=All``), which the API server authorizes, admits,
validates and checks against PodDisruptionBudgets exactly like the real call; then,
unless the intent is a dry run (policy ``mode: dry-run``), ``fence()`` (does this
executor still hold the target's lease?) and the real call.

Errors: the kubernetes client's exceptions are translated in ``Session`` into this
module's ``KubeError`` family and never leave the actuator; ``run`` turns every one into
an ``Outcome`` that says what happened. A conflict (409) re-reads the object and tries
again, ``CONFLICT_ATTEMPTS`` times in all; a 403 is a mismatch between the persona's
scopes and the RBAC applied to its user (``zeta-agent render rbac``), not retried; a 429
on an eviction is a PodDisruptionBudget saying "not now", retried until the drain's
deadline.

The sync kubernetes client runs in worker threads; ``ClientApi`` is the adapter that
speaks to it and converts its models into the small types below at the edge.
"""

from __future__ import annotations

import asyncio
import json
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal, Protocol, TypeAlias, TypeVar

import structlog
import urllib3
from kubernetes import client
from kubernetes.client.exceptions import ApiException, OpenApiException

from bus.messages import Target
from runtime.core.engine import Intent
from runtime.core.ports import Actuator, Fence, Outcome
from runtime.kube.client import load_client
from runtime.model.catalog import (
    OPT_OUT_LABEL,
    PERSONA_ANNOTATION,
    REPAIR_ANNOTATION,
    DrainParams,
    PodDeleteParams,
)
from runtime.model.durations import format_duration
from runtime.model.formats import Persona, opted_out

log = structlog.get_logger()

T = TypeVar("T")
Patch: TypeAlias = dict[str, Any]
WorkloadKind = Literal["deployment", "statefulset", "daemonset"]

CONFLICT_ATTEMPTS = 3
REQUEST_TIMEOUT = 15.0
"""Seconds one API request may take, so a hung API server cannot hold a worker thread."""
MIRROR_ANNOTATION = "kubernetes.io/config.mirror"
RESTARTED_AT = "kubectl.kubernetes.io/restartedAt"
TERMINAL_PHASES = ("Succeeded", "Failed")


# ---------------------------------------------------------------- the API, in our own types


@dataclass(frozen=True)
class NodeState:
    name: str
    unschedulable: bool
    annotations: Mapping[str, str]
    resource_version: str
    # False while the node's Ready condition is not True: its kubelet is not there to
    # finish the termination of its pods.
    ready: bool = True
    labels: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class PodState:
    namespace: str
    name: str
    uid: str
    phase: str = "Running"
    controller: str | None = None  # the kind of the owner reference marked controller
    mirror: bool = False
    terminating: bool = False

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class WorkloadState:
    kind: WorkloadKind
    namespace: str
    name: str
    paused: bool = False
    on_delete: bool = False  # updateStrategy OnDelete: a template change replaces no pod
    labels: Mapping[str, str] = field(default_factory=dict)  # its pod template's


class KubeApi(Protocol):
    """The calls the actuators make: synchronous (they run in worker threads).

    ``dry_run`` asks the API server for ``dryRun=All``. Failures raise the kubernetes
    client's ``ApiException`` (or a transport error); ``Session`` translates them.
    """

    @property
    def server(self) -> str:
        """The API server's URL, for messages."""
        ...

    def read_node(self, name: str) -> NodeState: ...

    def patch_node(self, name: str, patch: Patch, *, dry_run: bool) -> None: ...

    def pods_on(self, node: str) -> list[PodState]: ...

    def evict(self, pod: PodState, *, dry_run: bool) -> None: ...

    def delete_pod(self, namespace: str, name: str, *, grace_seconds: int | None,
                   dry_run: bool) -> None: ...

    def read_workload(self, kind: WorkloadKind, namespace: str, name: str) -> WorkloadState: ...

    def patch_workload(self, kind: WorkloadKind, namespace: str, name: str, patch: Patch, *,
                       dry_run: bool) -> None: ...


def _dry(dry_run: bool) -> str | None:
    return "All" if dry_run else None


def _template_labels(spec: client.V1DeploymentSpec | client.V1StatefulSetSpec
                     | client.V1DaemonSetSpec | None) -> dict[str, str]:
    template = spec.template if spec is not None else None
    metadata = template.metadata if template is not None else None
    return dict(metadata.labels or {}) if metadata is not None else {}


def _pod_state(pod: client.V1Pod) -> PodState:
    meta = pod.metadata or client.V1ObjectMeta()
    controller = next((ref.kind for ref in meta.owner_references or () if ref.controller), None)
    return PodState(
        namespace=meta.namespace or "", name=meta.name or "", uid=meta.uid or "",
        phase=(pod.status.phase if pod.status else None) or "Unknown", controller=controller,
        mirror=MIRROR_ANNOTATION in (meta.annotations or {}),
        terminating=meta.deletion_timestamp is not None)


class ClientApi:
    """``KubeApi`` over the official (sync) kubernetes client."""

    def __init__(self, api_client: client.ApiClient, *, timeout: float = REQUEST_TIMEOUT) -> None:
        self._core = client.CoreV1Api(api_client)
        self._apps = client.AppsV1Api(api_client)
        self._timeout = timeout
        self._server = str(api_client.configuration.host)

    @classmethod
    def from_kubeconfig(cls, path: Path, *, timeout: float = REQUEST_TIMEOUT) -> ClientApi:
        """Connect as the user of ``path``'s current context (nothing is sent yet)."""
        api_client = load_client(path)  # raises KubeconfigError
        return cls(api_client, timeout=timeout)

    @property
    def server(self) -> str:
        return self._server

    def read_node(self, name: str) -> NodeState:
        node = self._core.read_node(name, _request_timeout=self._timeout)
        meta = node.metadata or client.V1ObjectMeta()
        return NodeState(name=meta.name or name,
                         unschedulable=bool(node.spec and node.spec.unschedulable),
                         annotations=dict(meta.annotations or {}),
                         resource_version=meta.resource_version or "",
                         ready=any(c.type == "Ready" and c.status == "True"
                                   for c in (node.status and node.status.conditions) or ()),
                         labels=dict(meta.labels or {}))

    def patch_node(self, name: str, patch: Patch, *, dry_run: bool) -> None:
        self._core.patch_node(name, patch, dry_run=_dry(dry_run), _request_timeout=self._timeout)

    def pods_on(self, node: str) -> list[PodState]:
        pods = self._core.list_pod_for_all_namespaces(field_selector=f"spec.nodeName={node}",
                                                      _request_timeout=self._timeout)
        return [_pod_state(pod) for pod in pods.items]

    def evict(self, pod: PodState, *, dry_run: bool) -> None:
        # The UID precondition: a pod re-created under the same name (a StatefulSet's) is
        # another pod, and evicting it is a conflict, not a success.
        body = client.V1Eviction(
            metadata=client.V1ObjectMeta(name=pod.name, namespace=pod.namespace),
            delete_options=client.V1DeleteOptions(
                preconditions=client.V1Preconditions(uid=pod.uid)))
        self._core.create_namespaced_pod_eviction(pod.name, pod.namespace, body,
                                                  dry_run=_dry(dry_run),
                                                  _request_timeout=self._timeout)

    def delete_pod(self, namespace: str, name: str, *, grace_seconds: int | None,
                   dry_run: bool) -> None:
        self._core.delete_namespaced_pod(name, namespace, dry_run=_dry(dry_run),
                                         grace_period_seconds=grace_seconds,
                                         _request_timeout=self._timeout)

    def read_workload(self, kind: WorkloadKind, namespace: str, name: str) -> WorkloadState:
        if kind == "deployment":
            deployment = self._apps.read_namespaced_deployment(name, namespace,
                                                               _request_timeout=self._timeout)
            return WorkloadState(kind, namespace, name,
                                 paused=bool(deployment.spec and deployment.spec.paused),
                                 labels=_template_labels(deployment.spec))
        spec: client.V1StatefulSetSpec | client.V1DaemonSetSpec | None
        if kind == "statefulset":
            spec = self._apps.read_namespaced_stateful_set(
                name, namespace, _request_timeout=self._timeout).spec
        else:
            spec = self._apps.read_namespaced_daemon_set(
                name, namespace, _request_timeout=self._timeout).spec
        strategy = spec.update_strategy if spec else None
        return WorkloadState(kind, namespace, name,
                             on_delete=strategy is not None and strategy.type == "OnDelete",
                             labels=_template_labels(spec))

    def patch_workload(self, kind: WorkloadKind, namespace: str, name: str, patch: Patch, *,
                       dry_run: bool) -> None:
        patchers = {"deployment": self._apps.patch_namespaced_deployment,
                    "statefulset": self._apps.patch_namespaced_stateful_set,
                    "daemonset": self._apps.patch_namespaced_daemon_set}
        patchers[kind](name, namespace, patch, dry_run=_dry(dry_run),
                       _request_timeout=self._timeout)


# ---------------------------------------------------------------- errors


@dataclass(frozen=True)
class Call:
    """One API call, as RBAC names it: ``patch nodes worker-1``."""

    verb: str
    resource: str
    name: str

    def __str__(self) -> str:
        return f"{self.verb} {self.resource} {self.name}"


class KubeError(Exception):
    """A Kubernetes call failed; says which call, and the API server's own words."""

    def __init__(self, call: Call, message: str, status: int | None = None) -> None:
        super().__init__(f"{call}: {message}")
        self.call, self.message, self.status = call, message, status


class ForbiddenError(KubeError):
    """403: RBAC does not allow the call."""


class NotFoundError(KubeError):
    """404: the object is not there."""


class ConflictError(KubeError):
    """409: the object changed since it was read (or a precondition no longer holds)."""


class TooManyRequestsError(KubeError):
    """429: on an eviction, a PodDisruptionBudget allows no disruption right now."""


class UnreachableError(KubeError):
    """No answer from the API server."""


class StaleFenceError(Exception):
    """The executor's lease moved on: it must not make the call it was about to make."""

    def __init__(self, call: Call) -> None:
        super().__init__(f"fencing token stale: stopped before {call}")
        self.call = call


_BY_STATUS: dict[int, type[KubeError]] = {
    403: ForbiddenError, 404: NotFoundError, 409: ConflictError, 429: TooManyRequestsError}


def _server_message(exc: ApiException) -> str:
    """The ``message`` of the Status the API server sent, else the HTTP reason."""
    try:
        status = json.loads(exc.body or "")
    except ValueError:
        status = None
    if isinstance(status, dict) and isinstance(status.get("message"), str):
        return str(status["message"])
    return f"HTTP {exc.status} {exc.reason or ''}".strip()


def _translate(call: Call, exc: ApiException) -> KubeError:
    """The ``KubeError`` for an ``ApiException`` the client raised during ``call``."""
    kind = _BY_STATUS.get(exc.status or 0, KubeError)
    return kind(call, _server_message(exc), exc.status)


# ---------------------------------------------------------------- the one way to the API


@dataclass
class Session:
    """One actuator run's access to the API: reads, and changes that are dry-run first.

    ``done`` lists the real changes made, so a run that stops half-way says how far it got.
    """

    api: KubeApi
    dry_run: bool
    fence: Fence
    done: list[str] = field(default_factory=list)

    async def _send(self, call: Call, request: Callable[[], T]) -> T:
        try:
            return await asyncio.to_thread(request)
        except ApiException as exc:
            raise _translate(call, exc) from exc
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise UnreachableError(call, f"API server {self.api.server} unreachable: {exc}") \
                from exc
        except OpenApiException as exc:
            raise KubeError(call, f"{type(exc).__name__}: {exc}") from exc

    async def read(self, call: Call, request: Callable[[KubeApi], T]) -> T:
        """Make a call that changes nothing."""
        return await self._send(call, lambda: request(self.api))

    async def rehearse(self, call: Call, request: Callable[[KubeApi, bool], object]) -> None:
        """Ask the API server whether a change would be accepted (``dryRun=All``),
        changing nothing; raises what it would refuse with."""
        await self._send(call, lambda: request(self.api, True))

    async def change(self, call: Call, request: Callable[[KubeApi, bool], object]) -> None:
        """Make a change: dry run first; then, unless this is a dry run, fence and for real.

        ``request(api, dry_run)`` must pass ``dry_run`` on to the API; it is called once
        with True and, only when everything allows it, once with False.
        """
        await self._send(call, lambda: request(self.api, True))
        if self.dry_run:
            log.debug("dry run accepted", call=str(call))
            return
        if not await self.fence():
            raise StaleFenceError(call)
        await self._send(call, lambda: request(self.api, False))
        self.done.append(str(call))
        log.info("kubernetes change made", call=str(call))


async def retrying_conflicts(attempt: Callable[[], Awaitable[T]], *, what: str,
                             attempts: int = CONFLICT_ATTEMPTS) -> T:
    """Run ``attempt`` (read, decide, write) again after a 409, ``attempts`` times in all."""
    for number in range(1, attempts):
        try:
            return await attempt()
        except ConflictError as exc:
            log.warning(f"attempt #{number}/{attempts} failed; will retry", what=what,
                        error=exc.message)
    return await attempt()


# ---------------------------------------------------------------- actuators


class KubernetesActuator(ABC):
    """What every Kubernetes actuator shares: a ``Session`` per run, errors as Outcomes."""

    action: str

    def __init__(self, api: KubeApi, *, persona: str, user: str) -> None:
        self._api = api
        self.persona = persona
        self.user = user

    async def run(self, intent: Intent, *, repair: str, dry_run: bool, fence: Fence) -> Outcome:
        """Carry out ``intent``; never raises a Kubernetes error, reports it."""
        session = Session(self._api, dry_run=dry_run, fence=fence)
        with structlog.contextvars.bound_contextvars(repair=repair, action=intent.action.name,
                                                     target=intent.target.key):
            try:
                outcome = await self._act(intent, repair, session)
            except StaleFenceError as exc:
                outcome = Outcome(False, f"{exc}: the lease on {intent.target.key} moved on")
            except OptedOutError as exc:
                outcome = Outcome(False, str(exc))
            except ForbiddenError as exc:
                outcome = Outcome(False, (
                    f"scope/RBAC mismatch: {self.persona}'s scopes allow {intent.action.name}, "
                    f"but RBAC does not let {self.user} {exc.call.verb} {exc.call.resource} "
                    f"({exc.message}); apply `zeta-agent render rbac {self.persona}`"))
            except ConflictError as exc:
                outcome = Outcome(False, f"{exc} (still conflicting after "
                                         f"{CONFLICT_ATTEMPTS} attempts)")
            except KubeError as exc:
                outcome = Outcome(False, str(exc))
        if not outcome.ok and session.done:
            outcome = Outcome(False, f"{outcome.detail}; done before stopping: "
                                     f"{', '.join(session.done)}")
        return outcome

    @abstractmethod
    async def _act(self, intent: Intent, repair: str, session: Session) -> Outcome:
        """The actuator's own work; Kubernetes errors propagate to ``run``."""


def _said(session: Session, would: str, did: str) -> str:
    """What a change did, or in a dry run what it would do."""
    return f"dry-run (the API server accepted it): would {would}" if session.dry_run else did


class OptedOutError(Exception):
    """The object carries the opt-out label: no agent acts on it."""


async def _read_node(session: Session, node: str) -> NodeState:
    """The node as the API server has it now; an opted-out node stops the action here,
    however recent the snapshot that proposed it."""
    state = await session.read(Call("get", "nodes", node), lambda api: api.read_node(node))
    if opted_out(state.labels):
        raise OptedOutError(f"node {node} is labelled {OPT_OUT_LABEL}=true: no agent acts on it")
    return state


async def ensure_cordoned(session: Session, node: str, *, repair: str, persona: str) -> str:
    """Cordon ``node`` for ``repair`` and say what was done.

    A cordon placed by a person (no repair annotation) is left alone and not claimed:
    the cordon-without-owner policy must never lift it. A cordon of an earlier repair
    passes to this one, which now holds the node's lease.
    """

    async def attempt() -> str:
        state = await _read_node(session, node)
        owner = state.annotations.get(REPAIR_ANNOTATION)
        if state.unschedulable and owner is None:
            return (f"{node} was already cordoned without a {REPAIR_ANNOTATION} annotation "
                    "(by a person): left as it is, not claimed")
        if state.unschedulable and owner == repair:
            return f"{node} already cordoned by this repair"
        patch: Patch = {
            "metadata": {"resourceVersion": state.resource_version,
                         "annotations": {REPAIR_ANNOTATION: repair, PERSONA_ANNOTATION: persona}},
            "spec": {"unschedulable": True}}
        await session.change(Call("patch", "nodes", node),
                             lambda api, dry: api.patch_node(node, patch, dry_run=dry))
        taken = f" (taking it over from repair {owner})" if owner else ""
        return (_said(session, f"cordon {node}", f"cordoned {node}")
                + f"{taken}, annotated with repair {repair} "
                f"and persona {persona}")

    return await retrying_conflicts(attempt, what=f"cordon {node}")


class Cordon(KubernetesActuator):
    """``k8s.node.cordon``: mark the node unschedulable, annotated with repair and persona."""

    action = "k8s.node.cordon"

    async def _act(self, intent: Intent, repair: str, session: Session) -> Outcome:
        return Outcome(True, await ensure_cordoned(session, intent.target.name, repair=repair,
                                                   persona=self.persona))


class Uncordon(KubernetesActuator):
    """``k8s.node.uncordon``: lift a cordon an agent placed, and its annotations.

    A cordon without a repair annotation was placed by a person and is refused. When the
    finding names the repair that owns the cordon (cordon-without-owner does), a cordon
    that has since passed to another repair is refused too: that repair is still at work.
    """

    action = "k8s.node.uncordon"

    async def _act(self, intent: Intent, repair: str, session: Session) -> Outcome:
        node = intent.target.name
        expected = intent.finding.evidence.get("repair")

        async def attempt() -> Outcome:
            state = await _read_node(session, node)
            owner = state.annotations.get(REPAIR_ANNOTATION)
            if state.unschedulable and owner is None:
                return Outcome(False, f"{node} was cordoned by a person (no "
                                      f"{REPAIR_ANNOTATION} annotation): an agent never lifts it")
            if isinstance(expected, str) and owner is not None and owner != expected:
                return Outcome(False, f"the cordon of {node} now belongs to repair {owner}, "
                                      f"not {expected}: left in place")
            ours = {REPAIR_ANNOTATION, PERSONA_ANNOTATION} & set(state.annotations)
            if not state.unschedulable and not ours:
                return Outcome(True, f"{node} is already schedulable")
            patch: Patch = {
                "metadata": {"resourceVersion": state.resource_version,
                             # null deletes a key in a merge patch
                             "annotations": dict.fromkeys(sorted(ours))},
                "spec": {"unschedulable": None}}
            await session.change(Call("patch", "nodes", node),
                                 lambda api, dry: api.patch_node(node, patch, dry_run=dry))
            return Outcome(True, _said(session, f"uncordon {node}", f"uncordoned {node}")
                           + f", removing the annotations of repair {owner}")

        return await retrying_conflicts(attempt, what=f"uncordon {node}")


@dataclass(frozen=True)
class DrainPlan:
    """What to do with each pod on a node."""

    evict: tuple[PodState, ...]
    terminating: tuple[PodState, ...]  # already going: only waited for
    skip: Mapping[str, str]  # pod → why it stays (its controller does not honour a cordon)
    refuse: Mapping[str, str]  # pod → why evicting it would be wrong without a person

    def left_to_the_control_plane(self) -> tuple[PodState, ...]:
        """The terminating pods not worth waiting for while the node is not Ready.

        Without a kubelet nobody finishes a deletion: the pod stays Terminating until
        the node comes back or is removed. Its ReplicaSet, Job or DaemonSet already
        counts it as gone and has replaced it, so the drain has done its part. A
        StatefulSet does not: it starts the replacement only once the old pod is really
        gone, because two pods with one identity must never run, so those are still
        waited for (and reported if they outlast the drain's deadline).
        """
        return tuple(p for p in self.terminating if p.controller != "StatefulSet")


def plan_drain(pods: Sequence[PodState]) -> DrainPlan:
    """Sort a node's pods as ``kubectl drain --ignore-daemonsets`` would."""
    evict: list[PodState] = []
    terminating: list[PodState] = []
    skip: dict[str, str] = {}
    refuse: dict[str, str] = {}
    for pod in pods:
        if pod.terminating:
            terminating.append(pod)
        elif pod.mirror:
            skip[pod.key] = "mirror pod (the kubelet runs it from a static manifest)"
        elif pod.controller == "DaemonSet":
            skip[pod.key] = "DaemonSet pod (it would come straight back)"
        elif pod.controller is None and pod.phase not in TERMINAL_PHASES:
            refuse[pod.key] = "no controller would re-create it; a person must decide"
        else:
            evict.append(pod)
    return DrainPlan(tuple(evict), tuple(terminating), skip, refuse)


async def _pods_on(session: Session, node: str) -> list[PodState]:
    return await session.read(Call("list", "pods", f"on {node}"), lambda api: api.pods_on(node))


def _eviction(pod: PodState) -> tuple[Call, Callable[[KubeApi, bool], None]]:
    return (Call("create", "pods/eviction", pod.key),
            lambda api, dry: api.evict(pod, dry_run=dry))


async def _evict(session: Session, pod: PodState) -> None:
    await session.change(*_eviction(pod))


async def refused_evictions(session: Session, pods: Iterable[PodState]) -> dict[str, str]:
    """The pods whose eviction the API server would refuse now (a dry run of each, so
    every PodDisruptionBudget is judged by the API server itself), and why."""
    refused: dict[str, str] = {}
    for pod in pods:
        try:
            await session.rehearse(*_eviction(pod))
        except (TooManyRequestsError, ConflictError) as exc:
            refused[pod.key] = exc.message
        except NotFoundError:
            pass  # gone already
    return refused


class Drain(KubernetesActuator):
    """``k8s.node.drain``: cordon, then evict every evictable pod, honouring PDBs.

    Only the Eviction API is used, never a delete, so PodDisruptionBudgets hold. Before
    anything changes, every eviction is asked for as a server-side dry run: when a budget
    refuses one now, the drain does not start (a drain that a budget stalls leaves the
    node cordoned and half drained for its whole timeout). During the drain, an
    eviction answered 429 is tried again with backoff until ``params.timeout``. The
    node's pods are listed again each round: evicted ones are waited for until they are
    gone, and pods that arrived meanwhile are evicted too. On a node that is not Ready
    nobody finishes a termination, so there the wait ends once the controllers have
    replaced the pods (see ``DrainPlan.left_to_the_control_plane``). DaemonSet and mirror pods
    stay; pods without a controller are not evicted (they would be lost, ``kubectl
    drain`` asks for ``--force``), and the drain then reports failure naming them.
    """

    action = "k8s.node.drain"
    FIRST_BACKOFF = 0.5
    MAX_BACKOFF = 5.0

    def __init__(self, api: KubeApi, *, persona: str, user: str,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        super().__init__(api, persona=persona, user=user)
        self._clock, self._sleep = clock, sleep

    async def _act(self, intent: Intent, repair: str, session: Session) -> Outcome:
        node = intent.target.name
        assert isinstance(intent.params, DrainParams)
        timeout = intent.params.timeout
        started = self._clock()
        deadline = started + timeout.total_seconds()
        if not session.dry_run:
            await _read_node(session, node)  # opted out, or gone: nothing is asked of it
            plan = plan_drain(await _pods_on(session, node))
            if refused := await refused_evictions(session, plan.evict):
                return Outcome(False, f"{node} not drained: the API server would refuse "
                                      f"evicting {self._reasons(refused)}; nothing evicted")
        cordon = await ensure_cordoned(session, node, repair=repair, persona=self.persona)
        if session.dry_run:
            return await self._dry_run(session, cordon, plan_drain(await _pods_on(session, node)))
        evicted: dict[str, str] = {}  # uid → pod
        attempts: dict[str, int] = {}  # pod → evictions refused so far
        blocked: dict[str, str] = {}  # pod → why its last eviction was refused
        backoff = self.FIRST_BACKOFF
        abandoned: dict[str, str] = {}  # uid → pod left Terminating on a node not Ready
        while True:
            ready = (await _read_node(session, node)).ready
            plan = plan_drain(await _pods_on(session, node))
            if not ready:
                abandoned.update((p.uid, p.key) for p in plan.left_to_the_control_plane())
            still = {p.key for p in (*plan.evict, *plan.terminating) if p.uid not in abandoned}
            blocked = {key: why for key, why in blocked.items() if key in still}
            progress = False
            for pod in (p for p in plan.evict if p.uid not in evicted):
                try:
                    await _evict(session, pod)
                except (TooManyRequestsError, ConflictError) as exc:
                    attempts[pod.key] = attempts.get(pod.key, 0) + 1
                    blocked[pod.key] = exc.message
                    log.info(f"eviction of {pod.key}: attempt #{attempts[pod.key]} failed; "
                             "will retry", reason=exc.message)
                    continue
                except NotFoundError:
                    pass  # gone already: as good as evicted
                evicted[pod.uid] = pod.key
                blocked.pop(pod.key, None)
                progress = True
            if not still:
                break
            now = self._clock()
            if now >= deadline:
                return Outcome(False, self._report(
                    f"{node} not drained within {format_duration(timeout)}", cordon, plan,
                    evicted, blocked, left=still, abandoned=abandoned))
            backoff = self.FIRST_BACKOFF if progress else min(backoff * 2, self.MAX_BACKOFF)
            await self._sleep(min(backoff, deadline - now))
        took = timedelta(seconds=round(self._clock() - started))
        if plan.refuse:
            return Outcome(False, self._report(
                f"{node} not drained: pods without a controller left on it", cordon, plan,
                evicted, blocked, left=set(), abandoned=abandoned))
        return Outcome(True, self._report(f"drained {node} in {format_duration(took)}", cordon,
                                          plan, evicted, blocked, left=set(),
                                          abandoned=abandoned))

    async def _dry_run(self, session: Session, cordon: str, plan: DrainPlan) -> Outcome:
        would: list[str] = []
        blocked: dict[str, str] = {}
        for pod in plan.evict:
            try:
                await _evict(session, pod)
                would.append(pod.key)
            except (TooManyRequestsError, ConflictError) as exc:
                blocked[pod.key] = exc.message
        parts = [cordon, f"would evict {len(would)} pods ({', '.join(would) or 'none'})"]
        if blocked:
            parts.append(f"would not start now, the API server refuses evicting "
                         f"{self._reasons(blocked)}")
        return Outcome(True, "; ".join(parts + self._leftovers(plan)))

    @staticmethod
    def _reasons(pods: Mapping[str, str]) -> str:
        return ", ".join(f"{key} ({why})" for key, why in sorted(pods.items()))

    def _leftovers(self, plan: DrainPlan) -> list[str]:
        parts = []
        if plan.skip:
            parts.append(f"skipped: {self._reasons(plan.skip)}")
        if plan.refuse:
            parts.append(f"not evicted: {self._reasons(plan.refuse)}")
        return parts

    def _report(self, head: str, cordon: str, plan: DrainPlan, evicted: Mapping[str, str],
                blocked: Mapping[str, str], *, left: set[str],
                abandoned: Mapping[str, str]) -> str:
        gone = ", ".join(sorted(evicted.values()))
        parts = [head, cordon, f"evicted {len(evicted)} pods ({gone})" if evicted
                 else "evicted no pod"]
        if abandoned:
            parts.append(f"left Terminating on the node, which is not Ready, for its kubelet "
                         f"or the pod garbage collector to finish (their controllers have "
                         f"replaced them): {', '.join(sorted(abandoned.values()))}")
        if left:
            waiting = {key: blocked.get(key, "evicted, still terminating") for key in left}
            parts.append(f"still on the node: {self._reasons(waiting)}")
        return "; ".join(parts + self._leftovers(plan))


class PodDelete(KubernetesActuator):
    """``k8s.pod.delete``: delete one pod (its controller re-creates it), with the grace given."""

    action = "k8s.pod.delete"

    async def _act(self, intent: Intent, repair: str, session: Session) -> Outcome:
        target = intent.target
        namespace = target.namespace or "default"
        assert isinstance(intent.params, PodDeleteParams)
        grace = intent.params.gracePeriodSeconds
        pod = f"pod {namespace}/{target.name}"

        async def attempt() -> Outcome:
            try:
                await session.change(
                    Call("delete", "pods", f"{namespace}/{target.name}"),
                    lambda api, dry: api.delete_pod(namespace, target.name, grace_seconds=grace,
                                                    dry_run=dry))
            except NotFoundError:
                return Outcome(True, f"{pod} is already gone")
            how = "" if grace is None else f" with a grace period of {grace}s"
            return Outcome(True, _said(session, f"delete {pod}", f"deleted {pod}") + how)

        return await retrying_conflicts(attempt, what=f"delete {pod}")


class WorkloadRestart(KubernetesActuator):
    """``k8s.workload.restart``: a rolling restart, as ``kubectl rollout restart`` does it.

    The pod template gets a new ``restartedAt`` annotation, so the controller replaces
    the pods by its own update strategy. A paused Deployment or an ``OnDelete`` workload
    would replace nothing, so the restart is refused rather than reported as done.
    """

    action = "k8s.workload.restart"

    def __init__(self, api: KubeApi, *, persona: str, user: str,
                 wall: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        super().__init__(api, persona=persona, user=user)
        self._wall = wall

    async def _act(self, intent: Intent, repair: str, session: Session) -> Outcome:
        target = intent.target
        kind = _workload_kind(target)
        namespace = target.namespace or "default"
        what = f"{kind} {namespace}/{target.name}"
        resource = f"{kind}s"

        async def attempt() -> Outcome:
            state = await session.read(Call("get", resource, f"{namespace}/{target.name}"),
                                       lambda api: api.read_workload(kind, namespace,
                                                                     target.name))
            if opted_out(state.labels):
                return Outcome(False, f"{what}'s pods are labelled {OPT_OUT_LABEL}=true: no "
                                      "agent restarts it")
            if state.paused:
                return Outcome(False, f"{what} is paused: a restart would replace no pod")
            if state.on_delete:
                return Outcome(False, f"{what} updates OnDelete: a restart would replace no pod")
            at = self._wall().astimezone(UTC).isoformat(timespec="seconds")
            patch: Patch = {"spec": {"template": {"metadata": {"annotations": {RESTARTED_AT: at}}}}}
            await session.change(
                Call("patch", resource, f"{namespace}/{target.name}"),
                lambda api, dry: api.patch_workload(kind, namespace, target.name, patch,
                                                    dry_run=dry))
            return Outcome(True, _said(session, f"restart {what}", f"restarted {what}")
                           + f" ({RESTARTED_AT}={at})")

        return await retrying_conflicts(attempt, what=f"restart {what}")


def _workload_kind(target: Target) -> WorkloadKind:
    if target.kind in ("deployment", "statefulset", "daemonset"):
        return target.kind
    raise ValueError(f"{target.key} is not a deployment, statefulset or daemonset")


ACTUATORS: tuple[type[KubernetesActuator], ...] = (Cordon, Uncordon, Drain, PodDelete,
                                                   WorkloadRestart)


def kubernetes_actuators(api: KubeApi, persona: Persona) -> dict[str, Actuator]:
    """Every Kubernetes actuator, acting as ``persona`` through ``api``."""
    user = persona.spec.identity.kubernetes.user
    return {kind.action: kind(api, persona=persona.name, user=user) for kind in ACTUATORS}
