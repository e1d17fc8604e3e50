"""The operator-facing file formats: Persona, RepairPolicy and Fleet (``apiVersion: zeta/v1``).

Every model forbids unknown fields, so a misspelled key is an error with a line
number (see ``runtime.config.loading``) instead of a setting that silently does nothing.
"""

from __future__ import annotations

import functools
import ipaddress
import re
import zoneinfo
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import PurePosixPath
from typing import Annotated, Any, Literal, Self

from cronsim import CronSim, CronSimError
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from bus.keys import check_user_public_key
from bus.limits import DUPLICATE_WINDOW, MIN_STREAM_AGE
from bus.messages import NO_EVIDENCE_RULE, EvidenceRule
from bus.subjects import PERSONA_NAME
from runtime.model import scopes as scoping
from runtime.model.catalog import (
    DESTRUCTIVE_MIN_APPROVALS,
    OPT_OUT_LABEL,
    Params,
    UnitName,
    UnknownActionError,
    lookup,
)
from runtime.model.durations import Duration, format_duration

API_VERSION = "zeta/v1"


class Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


PersonaName = Annotated[str, Field(pattern=PERSONA_NAME.pattern)]
Scope = Annotated[str, AfterValidator(scoping.check_known)]
UserKey = Annotated[str, AfterValidator(check_user_public_key)]
PolicyName = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9-]{0,62}$")]


class Metadata(Model):
    name: str


class PersonaMetadata(Model):
    name: PersonaName


class PolicyMetadata(Model):
    name: PolicyName


# ---------------------------------------------------------------- persona


class KubernetesIdentity(Model):
    user: str = Field(pattern=r"^[a-z0-9][a-z0-9.:-]*$")


class Identity(Model):
    nkey: UserKey
    kubernetes: KubernetesIdentity


Duty = Literal["propose", "vote", "execute", "veto"]


class RulesBrain(Model):
    """Deterministic: the policy engine's escalation ladder decides (the default)."""

    kind: Literal["rules"] = "rules"


class AnthropicBrain(Model):
    """A model picks among the ladder's steps; the rules brain decides whenever it cannot.

    Every setting has a default so ``zeta-agent think`` can try a persona whose brain
    is still ``rules``; the key is never here (``anthropic-api-key`` credential).
    """

    kind: Literal["anthropic"]
    model: str = Field(default="claude-sonnet-4-6", min_length=1)
    prompt: str | None = Field(
        default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*\.j2$",
        description="Jinja2 template next to the persona file; default <persona>.prompt.j2.")
    maxTokens: int = Field(default=1024, ge=64, le=32_000)  # noqa: N815
    timeout: Duration = Field(
        default=timedelta(seconds=20),
        description="Deadline of one deliberation, retries and retry-after waits included.")
    retries: int = Field(default=2, ge=0, le=5,
                         description="Further attempts after a rate limit, 5xx or lost connection.")
    observationTokens: int = Field(  # noqa: N815
        default=4000, ge=200, le=100_000,
        description="Estimated tokens of observations in the prompt; the rest is left out.")
    tokenBudgetPerHour: int = Field(  # noqa: N815
        default=200_000, ge=1000,
        description="Input plus output tokens per trailing hour; over it, rules only.")

    @field_validator("timeout")
    @classmethod
    def _bounded(cls, timeout: timedelta) -> timedelta:
        # A deliberation holds its findings' repairs back; past a minute the rules
        # brain's answer is worth more than a late model's.
        if not timedelta(seconds=1) <= timeout <= timedelta(seconds=60):
            raise ValueError("timeout must be between 1s and 60s")
        return timeout

    def template(self, persona: str) -> str:
        """The prompt template's file name."""
        return self.prompt or f"{persona}.prompt.j2"


Brain = Annotated[RulesBrain | AnthropicBrain, Field(discriminator="kind")]

UNIX_SOCKET = "unix:"
_SUN_PATH_MAX = 107  # bytes of sockaddr_un.sun_path on Linux, less the terminating NUL


@dataclass(frozen=True)
class TcpListen:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class UnixListen:
    path: PurePosixPath

    def __str__(self) -> str:
        return f"{UNIX_SOCKET}{self.path}"


def parse_listen(text: str) -> TcpListen | UnixListen:
    """``IP:PORT`` (``[IPv6]:PORT``) on a loopback address, or ``unix:/absolute/path``.

    Loopback only: the agent opens no port the network can reach (its unit allows
    AF_INET for the bus and the API server, not for serving); a collector on the host,
    or a proxy the operator chooses, carries metrics further.
    """
    if text.startswith(UNIX_SOCKET):
        path = PurePosixPath(text.removeprefix(UNIX_SOCKET))
        if not path.is_absolute():
            raise ValueError(f"{text!r}: a unix socket path must be absolute")
        if len(str(path).encode()) > _SUN_PATH_MAX:
            raise ValueError(f"{text!r}: a unix socket path has at most {_SUN_PATH_MAX} bytes")
        return UnixListen(path)
    host, colon, port = text.rpartition(":")
    if not colon or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"{text!r} is neither IP:PORT nor unix:/PATH")
    bare = host.removeprefix("[").removesuffix("]") if host.startswith("[") else host
    try:
        address = ipaddress.ip_address(bare)
    except ValueError:
        raise ValueError(f"{host!r} is not an IP address (write 127.0.0.1, not a name)") from None
    if not address.is_loopback:
        raise ValueError(f"{bare} is not a loopback address: metrics stay on this host")
    return TcpListen(bare, int(port))


def _check_listen(text: str) -> str:
    parse_listen(text)
    return text


class MetricsSpec(Model):
    """Where the agent serves Prometheus metrics; no ``metrics:`` means none are served."""

    listen: Annotated[str, AfterValidator(_check_listen)] = Field(
        description="127.0.0.1:PORT, [::1]:PORT or unix:/absolute/path.")


class PersonaSpec(Model):
    displayName: str = Field(min_length=1)  # noqa: N815
    role: str = Field(min_length=1)
    description: str = ""
    identity: Identity
    tier: scoping.Tier
    scopes: tuple[Scope, ...] = ()
    duties: tuple[Duty, ...] = Field(min_length=1)
    policies: tuple[PolicyName, ...] = ()
    tick: Duration = timedelta(seconds=15)
    brain: Brain = RulesBrain()
    metrics: MetricsSpec | None = None

    @field_validator("tier")
    @classmethod
    def _grantable(cls, tier: scoping.Tier) -> scoping.Tier:
        # A field validator, not the model one below, so the error points at `tier:`.
        if tier in scoping.NEVER_GRANTED:
            raise ValueError(f"tier {tier.value!r} is never granted to a daemon")
        return tier

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        granted = self.effective_scopes
        needs = {"propose": "bus:propose", "vote": "bus:vote", "veto": "bus:veto"}
        for duty in self.duties:
            scope = needs.get(duty)
            if scope and not scoping.allows(granted, scope):
                raise ValueError(f"duty {duty!r} needs scope {scope!r}, which the persona lacks")
        if len(set(self.duties)) != len(self.duties):
            raise ValueError("duties are listed more than once")
        if self.tick < timedelta(seconds=1):
            raise ValueError("tick must be at least 1s")
        return self

    @property
    def effective_scopes(self) -> tuple[str, ...]:
        return scoping.effective_scopes(self.tier, self.scopes)


class Persona(Model):
    """One agent: who it is, what it may do, which policies it runs."""

    apiVersion: Literal["zeta/v1"]  # noqa: N815 (Kubernetes-style wire names)
    kind: Literal["Persona"]
    metadata: PersonaMetadata
    spec: PersonaSpec

    @property
    def name(self) -> str:
        return self.metadata.name



# ---------------------------------------------------------------- policy: selectors


class Requirement(Model):
    """One set-based condition on a label, as Kubernetes label selectors write it."""

    key: str = Field(min_length=1, max_length=317)
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist"]
    values: tuple[str, ...] = ()

    @model_validator(mode="after")
    def _values_fit_operator(self) -> Self:
        if self.operator in ("In", "NotIn") and not self.values:
            raise ValueError(f"{self.operator} needs at least one value")
        if self.operator in ("Exists", "DoesNotExist") and self.values:
            raise ValueError(f"{self.operator} takes no values")
        return self

    def matches(self, labels: Mapping[str, str]) -> bool:
        match self.operator:
            case "In":
                return labels.get(self.key) in self.values
            case "NotIn":
                # As in Kubernetes: an object without the label is "not in" any set.
                return labels.get(self.key) not in self.values
            case "Exists":
                return self.key in labels
            case "DoesNotExist":
                return self.key not in labels


class Selector(Model):
    """Which objects a detector looks at: every ``matchLabels`` pair and every
    ``matchExpressions`` requirement must hold (empty: everything). A plain mapping of
    labels is read as ``matchLabels``."""

    matchLabels: dict[str, str] = Field(default_factory=dict)  # noqa: N815
    matchExpressions: tuple[Requirement, ...] = ()  # noqa: N815

    @model_validator(mode="before")
    @classmethod
    def _plain_labels(cls, value: Any) -> Any:
        if isinstance(value, dict) and value and not value.keys() & {"matchLabels",
                                                                      "matchExpressions"}:
            return {"matchLabels": value}
        return value

    def matches(self, labels: Mapping[str, str]) -> bool:
        return (all(labels.get(k) == v for k, v in self.matchLabels.items())
                and all(r.matches(labels) for r in self.matchExpressions))


def opted_out(labels: Mapping[str, str]) -> bool:
    """Whether the object's owners asked the agents to leave it alone."""
    return labels.get(OPT_OUT_LABEL, "").lower() == "true"


# ---------------------------------------------------------------- policy: detectors


class _Detect(Model):
    for_: Duration = Field(default=timedelta(0), alias="for",
                           description="The condition must hold this long before a finding opens.")


class NodeConditionDetect(_Detect):
    kind: Literal["node-condition"]
    condition: str = "Ready"
    status: tuple[Literal["True", "False", "Unknown"], ...] = ("False", "Unknown")
    selector: Selector = Field(default_factory=Selector,
                               description="Which nodes to look at, by label.")


class PodCrashloopDetect(_Detect):
    kind: Literal["pod-crashloop"]
    minRestarts: int = Field(default=3, ge=1)  # noqa: N815
    namespaces: tuple[str, ...] = ()
    selector: Selector = Field(default_factory=Selector,
                               description="Which pods to look at, by label.")


class ApiserverUnreachableDetect(_Detect):
    kind: Literal["apiserver-unreachable"]
    minPaths: int = Field(default=2, ge=1,  # noqa: N815
                          description="Independent probe paths that must all fail.")


class UnitFailedDetect(_Detect):
    kind: Literal["unit-failed"]
    units: tuple[str, ...] = Field(min_length=1)
    states: tuple[Literal["failed", "inactive"], ...] = ("failed",)


class PeerSilentDetect(_Detect):
    kind: Literal["peer-silent"]
    silentAfter: Duration = timedelta(seconds=30)  # noqa: N815


class CordonWithoutOwnerDetect(_Detect):
    kind: Literal["cordon-without-owner"]


class StaleLeaseDetect(_Detect):
    kind: Literal["stale-lease"]
    grace: Duration = timedelta(seconds=30)


Detect = Annotated[
    NodeConditionDetect | PodCrashloopDetect | ApiserverUnreachableDetect | UnitFailedDetect
    | PeerSilentDetect | CordonWithoutOwnerDetect | StaleLeaseDetect,
    Field(discriminator="kind"),
]


# ---------------------------------------------------------------- policy: remedies

Expectation = Literal["finding-cleared", "node-ready", "unit-active", "pod-ready",
                      "apiserver-reachable", "peer-heartbeat"]


class Verify(Model):
    within: Duration
    expect: Expectation = "finding-cleared"
    healthyFor: Duration = Field(  # noqa: N815
        default=timedelta(0),
        description="The expectation must hold on every tick for this long before the "
                    "repair counts as done (it has `within` to start holding).")


class Quorum(Model):
    approvals: int = Field(ge=1, le=32)
    veto: tuple[PersonaName, ...] = ()
    deadline: Duration = timedelta(seconds=30)
    evidence: EvidenceRule = Field(
        default=NO_EVIDENCE_RULE,
        description="Independent evidence: the approvals, the proposer's included, must name "
                    "this many distinct evidence paths (apiserver, host, network, peer) and "
                    "these ones (docs/safety.md#independent-evidence).")


class Remedy(Model):
    # Field order matters: the validators of `params` and `quorum` read `action`
    # and `destructive`, which pydantic has validated by then.
    action: str
    destructive: bool | None = Field(
        default=None, description="Only `true` is allowed on a non-destructive action.")
    params: dict[str, Any] = Field(default_factory=dict)
    verify: Verify | None = None
    quorum: Quorum | None = None

    @field_validator("action")
    @classmethod
    def _in_catalog(cls, action: str) -> str:
        try:
            lookup(action)
        except UnknownActionError as exc:
            raise ValueError(exc.args[0]) from None
        return action

    @field_validator("destructive")
    @classmethod
    def _not_below_floor(cls, destructive: bool | None, info: ValidationInfo) -> bool | None:
        action = info.data.get("action")
        if destructive is False and action and lookup(action).destructive:
            raise ValueError(f"{action} is destructive; a policy may not mark it non-destructive")
        return destructive

    @field_validator("params")
    @classmethod
    def _typed(cls, params: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        action = info.data.get("action")
        if action:
            try:
                lookup(action).params.model_validate(params)
            except ValidationError as exc:
                raise ValueError("; ".join(
                    f"{'.'.join(map(str, e['loc'])) or 'params'}: {e['msg']}"
                    for e in exc.errors())) from None
        return params

    @field_validator("quorum")
    @classmethod
    def _quorum_floor(cls, quorum: Quorum | None, info: ValidationInfo) -> Quorum | None:
        action = info.data.get("action")
        if quorum is None or not action:
            return quorum
        floor = lookup(action).min_approvals
        if info.data.get("destructive"):
            floor = max(floor, DESTRUCTIVE_MIN_APPROVALS)
        if quorum.approvals < floor:
            raise ValueError(
                f"approvals {quorum.approvals} is looser than the floor of {action} ({floor})")
        return quorum

    @property
    def is_destructive(self) -> bool:
        return lookup(self.action).destructive or bool(self.destructive)

    def quorum_under(self, default: Quorum) -> Quorum | None:
        """The quorum this step needs: its own, the fleet's ``default`` if destructive,
        else none."""
        return self.quorum or (default if self.is_destructive else None)

    def typed_params(self) -> Params:
        return lookup(self.action).params.model_validate(self.params)


class Budget(Model):
    maxInFlight: int = Field(default=1, ge=1)  # noqa: N815
    perHour: int = Field(default=6, ge=1)  # noqa: N815
    maxUnhealthyFraction: float | None = Field(default=None, gt=0, le=1)  # noqa: N815
    maxAttempts: int = Field(  # noqa: N815
        default=3, ge=1, le=100,
        description="Repair actions started on one target within `attemptsWindow`; after "
                    "that the agents stop repairing it and escalate to people.")
    attemptsWindow: Duration = Field(  # noqa: N815
        default=timedelta(hours=24), description="The window `maxAttempts` counts over.")


class PolicySpec(Model):
    description: str = ""
    detect: Detect
    remedies: tuple[Remedy, ...] = Field(min_length=1)
    budget: Budget = Budget()
    cooldown: Duration = timedelta(minutes=10)
    mode: Literal["enforce", "dry-run"] = "enforce"


class RepairPolicy(Model):
    apiVersion: Literal["zeta/v1"]  # noqa: N815
    kind: Literal["RepairPolicy"]
    metadata: PolicyMetadata
    spec: PolicySpec

    @property
    def name(self) -> str:
        return self.metadata.name


# ---------------------------------------------------------------- fleet


BUS_SCHEMES = ("nats", "tls", "ws", "wss")


# SCHEME://[USERINFO@]HOST[:PORT][/]: a regular expression, not urllib.parse, which
# the model may not import (the I/O wall squashes urllib to one package).
_URL = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*)://(?P<userinfo>[^@/?#]*@)?"
                  r"(?P<host>\[[0-9A-Fa-f:.]+\]|[^:/?#@\s\[\]]+)(?::(?P<port>[^/?#]*))?"
                  r"(?P<rest>.*)", re.DOTALL)


def check_url(text: str, schemes: tuple[str, ...], example: str) -> str:
    """``text`` if it is SCHEME://HOST[:PORT] with one of ``schemes``, else ValueError.

    Credentials in the URL are refused: secrets never live in configuration files
    (an agent authenticates with its nkey seed).
    """
    expected = f"expected a URL like {example}, got {text!r}"
    scheme, separator, _ = text.partition("://")
    if not separator or scheme not in schemes:
        raise ValueError(f"{expected}: the scheme must be one of {', '.join(schemes)}")
    parts = _URL.fullmatch(text)
    if parts is None:
        raise ValueError(f"{expected}: no host")
    if parts["userinfo"] is not None:
        raise ValueError(f"{text!r} holds credentials; secrets never live in configuration "
                         "files (the agents authenticate with their nkey seeds)")
    port = parts["port"]
    if port is not None and not (port.isdigit() and 0 < int(port) < 65536):
        raise ValueError(f"{expected}: the port must be a number from 1 to 65535")
    if parts["rest"] not in ("", "/"):
        raise ValueError(f"{expected}: no path, query or fragment")
    return text


def _some(values: tuple[str, ...]) -> tuple[str, ...]:
    # Not min_length: pydantic would add "too short" to every bad item's own error.
    if not values:
        raise ValueError("at least one URL is needed")
    return values


def check_bus_url(text: str) -> str:
    return check_url(text, BUS_SCHEMES, "nats://10.0.0.1:4222")


def _check_apiserver_url(text: str) -> str:
    return check_url(text, ("https",), "https://10.0.0.1:6443")


class BusSettings(Model):
    urls: Annotated[tuple[Annotated[str, AfterValidator(check_bus_url)], ...],
                    AfterValidator(_some)] = ("nats://127.0.0.1:4222",)
    auditReplicas: int = Field(default=1, ge=1, le=5)  # noqa: N815
    auditMaxAge: Duration = Field(  # noqa: N815
        default=timedelta(days=90),
        description="0s keeps the audit forever; otherwise at least the stream's duplicate "
                    "window, 10m, which nats-server requires.")
    freshness: Duration = Field(
        default=timedelta(seconds=30),
        description="Messages stamped further than this from now are dropped as stale.")
    leaseTtl: Duration = Field(  # noqa: N815
        default=timedelta(minutes=30),
        description="A repair lease nobody released expires after this long.")

    @field_validator("auditMaxAge")
    @classmethod
    def _audit_age(cls, age: timedelta) -> timedelta:
        # nats-server refuses a max age under the duplicate window (10m, which catches
        # a message republished after a reconnect); 0 means no limit.
        if timedelta(0) < age < DUPLICATE_WINDOW:
            raise ValueError(f"must be 0s (keep forever) or at least "
                             f"{format_duration(DUPLICATE_WINDOW)}: nats-server refuses "
                             "an audit stream that forgets messages before its duplicate "
                             "window ends")
        return age

    @field_validator("leaseTtl")
    @classmethod
    def _lease_ttl(cls, ttl: timedelta) -> timedelta:
        if ttl < MIN_STREAM_AGE:
            raise ValueError(f"must be at least {format_duration(MIN_STREAM_AGE)}, the "
                             "shortest max age nats-server accepts")
        return ttl


class BusUser(Model):
    """A person or tool on the bus that is not a persona: an operator or a watcher."""

    name: PersonaName
    nkey: UserKey


class ObserverOutage(Model):
    window: Duration = Field(
        default=timedelta(minutes=5),
        description="NotReady nodes that went NotReady up to this long after this agent last "
                    "saw the API server unreachable are taken for the outage, not for the nodes.")
    minNodes: int = Field(  # noqa: N815
        default=2, ge=1,
        description="That many nodes going NotReady in the window is an outage of the observer.")


class HostEvidence(Model):
    """How an agent on a Kubernetes node sees its own kubelet, for its heartbeat (the
    ``host`` evidence path), and how long a voter's own probes may take."""

    units: tuple[UnitName, ...] = Field(
        default=("kubelet.service", "containerd.service"), min_length=1, max_length=8,
        description="The units reported; the first is the kubelet's.")
    kubeletHealthz: str = Field(  # noqa: N815
        default="http://127.0.0.1:10248/healthz", pattern=r"^https?://[^/\s]+(/\S*)?$",
        description="The kubelet's healthz endpoint as seen from its own host.")
    probeTimeout: Duration = Field(  # noqa: N815
        default=timedelta(seconds=2),
        description="The healthz request, and a voter's TCP probe of a node's kubelet port.")

    @field_validator("probeTimeout")
    @classmethod
    def _short(cls, timeout: timedelta) -> timedelta:
        if not timedelta(milliseconds=100) <= timeout <= timedelta(seconds=10):
            raise ValueError("must be between 100ms and 10s: a vote waits for it")
        return timeout


class Safety(Model):
    """The fleet-wide limits every persona with the veto duty reviews (docs/safety.md)."""

    disruptionBudget: int = Field(  # noqa: N815
        default=1, ge=0, le=1000,
        description="At most this many nodes disrupted by the agents at once, across all "
                    "policies (0: no node-level destructive repair at all).")
    observerOutage: ObserverOutage = ObserverOutage()  # noqa: N815
    hostEvidence: HostEvidence = HostEvidence()  # noqa: N815


def _check_http_url(text: str) -> str:
    return check_url(text, ("http", "https"), "http://127.0.0.1:9093")


HttpUrl = Annotated[str, AfterValidator(_check_http_url)]


class Webhook(Model):
    """A generic receiver: the alerts as a signed JSON body (docs/operations.md#alerts)."""

    url: str = Field(description="Where to POST; a path is allowed.",
                     pattern=r"^https?://[^/\s@]+(/\S*)?$")
    secret: str | None = Field(
        default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
        description="The credential holding the HMAC key (a file name under the persona's "
                    "credentials); without one the body is not signed.")


class AlertingSpec(Model):
    """Where the agents send alerts, and how often a firing one is refreshed."""

    alertmanagers: tuple[HttpUrl, ...] = Field(
        default=(), description="Alertmanager base URLs; each gets every alert (API v2).")
    webhooks: tuple[Webhook, ...] = ()
    resend: Duration = Field(
        default=timedelta(minutes=1),
        description="A firing alert is posted again this often.")
    resolveTimeout: Duration = Field(  # noqa: N815
        default=timedelta(minutes=5),
        description="A firing alert's endsAt is this far ahead of its last post, so it "
                    "resolves by itself if no agent is left to refresh it.")

    @model_validator(mode="after")
    def _refreshed_in_time(self) -> Self:
        if self.resend >= self.resolveTimeout:
            raise ValueError("resend must be shorter than resolveTimeout, or a firing alert "
                             "would lapse between two posts")
        return self


class MaintenanceWindow(Model):
    """A recurring time during which the matching policies' repairs are held, as by a pause."""

    name: PolicyName
    schedule: str = Field(description="When it opens: a 5-field cron expression "
                                      "(minute hour day-of-month month day-of-week).")
    duration: Duration = Field(description="How long it stays open (1m to 7d).")
    timeZone: str = Field(  # noqa: N815
        default="UTC", description="The IANA zone the schedule is read in, e.g. Europe/Berlin.")
    policies: tuple[PolicyName, ...] = Field(
        default=(), description="The policies it holds; empty: every policy.")

    @field_validator("schedule")
    @classmethod
    def _cron(cls, schedule: str) -> str:
        if len(schedule.split()) != 5:
            raise ValueError(f"expected 5 cron fields (minute hour day month weekday), "
                             f"got {schedule!r}")
        try:
            CronSim(schedule, datetime(2026, 1, 1, tzinfo=UTC))
        except CronSimError as exc:
            raise ValueError(f"not a cron expression: {exc}") from None
        return schedule

    @field_validator("duration")
    @classmethod
    def _length(cls, duration: timedelta) -> timedelta:
        if not timedelta(minutes=1) <= duration <= timedelta(days=7):
            raise ValueError("must be between 1m and 7d")
        return duration

    def closes(self, now: datetime) -> datetime | None:
        """When the window open at ``now`` closes, or None if it is not open.

        The schedule is read in the window's own zone (so `0 2 * * 6` is 02:00 local,
        across daylight saving time); the latest opening not after ``now`` is the one
        that counts.
        """
        local = now.astimezone(zoneinfo.ZoneInfo(self.timeZone))
        for opens in CronSim(self.schedule, local - self.duration - timedelta(minutes=1)):
            if opens > local:
                return None
            if local < opens + self.duration:
                return (opens + self.duration).astimezone(UTC)
        return None

    def holds(self, policy: str) -> bool:
        return not self.policies or policy in self.policies

    @field_validator("timeZone")
    @classmethod
    def _zone(cls, zone: str) -> str:
        if zone not in _zones():
            raise ValueError(f"{zone!r} is not an IANA time zone (e.g. UTC, Europe/Berlin)")
        return zone


def open_windows(windows: Iterable[MaintenanceWindow],
                 now: datetime) -> list[tuple[MaintenanceWindow, datetime]]:
    """The windows open at ``now``, each with when it closes."""
    return [(w, closes) for w in windows if (closes := w.closes(now)) is not None]


@functools.cache
def _zones() -> frozenset[str]:
    return frozenset(zoneinfo.available_timezones()) | {"UTC"}


class FleetSpec(Model):
    bus: BusSettings = BusSettings()
    alerting: AlertingSpec = AlertingSpec()
    maintenanceWindows: tuple[MaintenanceWindow, ...] = Field(  # noqa: N815
        default=(), description="Recurring holds on repairs (docs/operations.md).")
    operators: tuple[BusUser, ...] = Field(
        default=(), description="May sign freeze, thaw and breaker-reset controls.")
    watchers: tuple[BusUser, ...] = Field(
        default=(), description="May read the bus (nats sub 'zeta.>') and publish nothing.")
    credentialsDir: str = Field(  # noqa: N815
        default="/etc/zeta/credentials",
        description="Outside systemd, secrets are read from <credentialsDir>/<persona>/.")
    quorum: Quorum = Quorum(approvals=3, veto=("riven",), deadline=timedelta(seconds=30))
    safety: Safety = Safety()
    apiservers: Annotated[tuple[Annotated[str, AfterValidator(_check_apiserver_url)], ...],
                          AfterValidator(_some)] = Field(
        default=("https://127.0.0.1:6443",),
        description="Kubernetes API server URLs every agent probes, each an evidence path.")

    @model_validator(mode="after")
    def _quorum_floor(self) -> Self:
        if self.quorum.approvals < DESTRUCTIVE_MIN_APPROVALS:
            raise ValueError(
                f"quorum.approvals must be at least {DESTRUCTIVE_MIN_APPROVALS}: it is the "
                "default for destructive actions"
            )
        return self


class Fleet(Model):
    apiVersion: Literal["zeta/v1"]  # noqa: N815
    kind: Literal["Fleet"]
    metadata: Metadata = Metadata(name="default")
    spec: FleetSpec = FleetSpec()


DEFAULT_FLEET = Fleet(apiVersion="zeta/v1", kind="Fleet")

KINDS: dict[str, type[Persona] | type[RepairPolicy] | type[Fleet]] = {
    "Persona": Persona, "RepairPolicy": RepairPolicy, "Fleet": Fleet,
}
