"""What the agents tell people through Alertmanager: which alerts fire, and when to say so.

Pure. Each tick the agent computes the alerts that are true now (``RepairAlerts`` for
what its own repairs did, ``fleet_alerts`` for the fleet's state) and hands them to
an ``AlertBook``, which answers what to post: a new alert at once, a firing one again
every ``resend`` (Alertmanager forgets an alert whose ``endsAt`` passes, so a firing
alert carries ``endsAt = now + resolve_timeout`` and is refreshed well before), and
one that stopped being true once more with ``endsAt = now``, which resolves it.

One agent sends each alert, not five. A repair's alerts come from the agent that
carried it out (only its engine hears how it ended). A fleet-wide alert (a tripped
breaker, a freeze, a silent peer) is sent by its *owner*: the live persona with the
lowest name among those that see it. The labels of a fleet-wide alert do not name the
sender, so when the owner changes, or when a bus outage leaves every agent its own
owner, Alertmanager still sees one alert (its fingerprint is its label set).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Literal

Severity = Literal["critical", "warning", "info"]


@dataclass(frozen=True)
class Alert:
    """One alert as Alertmanager sees it: labels (its identity) and annotations."""

    name: str
    severity: Severity
    labels: Mapping[str, str]
    summary: str
    annotations: Mapping[str, str] = field(default_factory=dict)

    @property
    def key(self) -> tuple[tuple[str, str], ...]:
        """The label set, which is the alert's identity (its Alertmanager fingerprint)."""
        return tuple(sorted(self.all_labels.items()))

    @property
    def all_labels(self) -> dict[str, str]:
        return {"alertname": self.name, "severity": self.severity, "source": "zeta-agent",
                **self.labels}


@dataclass(frozen=True)
class Posting:
    """An alert to post now: firing until ``ends`` (or resolved, when ``ends`` is now)."""

    alert: Alert
    starts: datetime
    ends: datetime
    resolved: bool

    def as_json(self) -> dict[str, object]:
        """The Alertmanager API v2 ``postableAlert``."""
        return {"labels": self.alert.all_labels,
                "annotations": {"summary": self.alert.summary, **self.alert.annotations},
                "startsAt": _iso(self.starts), "endsAt": _iso(self.ends)}


def _iso(at: datetime) -> str:
    return at.isoformat().replace("+00:00", "Z")


@dataclass
class _Firing:
    alert: Alert
    since: datetime
    sent: datetime


class AlertBook:
    """The alerts firing now, and when each was last posted."""

    def __init__(self, *, resend: timedelta, resolve_timeout: timedelta) -> None:
        if resend >= resolve_timeout:
            raise ValueError("resend must be shorter than resolve_timeout, or a firing "
                             "alert would lapse between two posts")
        self.resend = resend
        self.resolve_timeout = resolve_timeout
        self._firing: dict[tuple[tuple[str, str], ...], _Firing] = {}

    def update(self, true_now: Iterable[Alert], now: datetime) -> list[Posting]:
        """What to post, given every alert that is true at ``now``."""
        postings: list[Posting] = []
        current = {alert.key: alert for alert in true_now}
        for key, gone in list(self._firing.items()):
            if key not in current:
                del self._firing[key]
                postings.append(Posting(gone.alert, gone.since, now, resolved=True))
        for key, alert in current.items():
            firing = self._firing.get(key)
            if firing is None:
                firing = self._firing[key] = _Firing(alert, now, now)
            elif now - firing.sent < self.resend and firing.alert == alert:
                continue
            firing.alert, firing.sent = alert, now
            postings.append(Posting(alert, firing.since, now + self.resolve_timeout,
                                    resolved=False))
        return postings

    @property
    def firing(self) -> list[Alert]:
        return [f.alert for f in self._firing.values()]

    def remember(self, alert: Alert, since: datetime) -> None:
        """Take back an alert that was firing before a restart: it is resolved on the
        first update that does not find it true, instead of lapsing unresolved."""
        self._firing[alert.key] = _Firing(alert, since, since)

    def since(self, alert: Alert) -> datetime | None:
        firing = self._firing.get(alert.key)
        return firing.since if firing is not None else None


# ---------------------------------------------------------------- what is true


def owner(me: str, candidates: Iterable[str], alive: Iterable[str]) -> bool:
    """Whether ``me`` sends a fleet-wide alert: the live candidate with the lowest name
    (``me`` always counts as live; without the bus, every agent is its own owner)."""
    living = set(alive) | {me}
    present = sorted(c for c in set(candidates) | {me} if c in living)
    return present[0] == me


@dataclass(frozen=True)
class _Sticky:
    alert: Alert
    policy: str
    target: str


class RepairAlerts:
    """What this agent's own repairs said: true until the finding they were for clears."""

    def __init__(self, persona: str) -> None:
        self.persona = persona
        self._sticky: dict[tuple[str, str, str], _Sticky] = {}

    def _labels(self, policy: str, target: str) -> dict[str, str]:
        return {"persona": self.persona, "policy": policy, "target": target}

    def _add(self, name: str, severity: Severity, policy: str, target: str, *, summary: str,
             repair: str | None) -> None:
        annotations = {"description": summary}
        if repair is not None:
            annotations |= {"repair": repair, "command": f"zeta-agent audit --repair {repair}"}
        else:
            annotations["command"] = f"zeta-agent audit | grep {target}"
        alert = Alert(name, severity, self._labels(policy, target), summary, annotations)
        self._sticky[(name, policy, target)] = _Sticky(alert, policy, target)

    def escalated(self, policy: str, target: str, detail: str, repair: str | None,
                  guard: str = "") -> None:
        """An escalation this agent carried out (a loop guard's, when ``guard`` says why)."""
        if guard:
            self._add("ZetaLoopGuardStopped", "critical", policy, target, repair=repair,
                      summary=f"{self.persona} stopped repairing {target} ({policy}): {guard}")
        else:
            self._add("ZetaEscalated", "critical", policy, target, repair=repair,
                      summary=f"{self.persona} escalated {target} ({policy}) to people: "
                              f"{detail}")

    def failed(self, policy: str, target: str, reason: str, repair: str | None) -> None:
        """A step of this agent's failed, or its verification was not met."""
        self._add("ZetaRepairFailed", "warning", policy, target, repair=repair,
                  summary=f"{self.persona}'s repair of {target} ({policy}) did not work: "
                          f"{reason}")

    def cleared(self, policy: str, target: str) -> None:
        """The finding is gone: what its repairs said is no longer true."""
        for key in [k for k, s in self._sticky.items() if (s.policy, s.target) == (policy,
                                                                                   target)]:
            del self._sticky[key]

    @property
    def alerts(self) -> list[Alert]:
        return [s.alert for s in self._sticky.values()]


@dataclass(frozen=True)
class Breaker:
    policy: str
    reason: str


@dataclass(frozen=True)
class Freeze:
    by: str
    reason: str


@dataclass(frozen=True)
class SilentPeer:
    peer: str
    summary: str


@dataclass(frozen=True)
class Paused:
    scope: str  # a policy, or "*" for every policy
    by: str
    reason: str
    until: str


@dataclass(frozen=True)
class FleetState:
    """What one agent sees of the fleet, for the fleet-wide alerts."""

    me: str
    alive: frozenset[str]
    runners: Mapping[str, frozenset[str]]  # policy → the personas that run it
    breakers: tuple[Breaker, ...] = ()
    freeze: Freeze | None = None
    silent: tuple[SilentPeer, ...] = ()
    everyone: frozenset[str] = frozenset()
    paused: tuple[Paused, ...] = ()


def fleet_alerts(state: FleetState) -> list[Alert]:
    """The fleet-wide alerts this agent owns."""
    alerts: list[Alert] = []
    for breaker in state.breakers:
        if owner(state.me, state.runners.get(breaker.policy, frozenset()), state.alive):
            alerts.append(Alert(
                "ZetaBreakerTripped", "critical", {"policy": breaker.policy},
                f"the {breaker.policy} breaker is open: no destructive repair of that policy "
                f"runs ({breaker.reason})",
                {"command": f"zeta-agent breaker-reset --policy {breaker.policy} "
                            "--operator NAME --reason '...'"}))
    if state.freeze is not None and owner(state.me, state.everyone, state.alive):
        alerts.append(Alert(
            "ZetaFleetFrozen", "warning", {},
            f"the fleet is frozen by {state.freeze.by}: {state.freeze.reason}",
            {"command": "zeta-agent thaw --operator NAME --reason '...'"}))
    for pause in state.paused:
        if owner(state.me, state.everyone, state.alive):
            what = "every policy" if pause.scope == "*" else f"policy {pause.scope}"
            alerts.append(Alert(
                "ZetaRepairsPaused", "info", {"policy": pause.scope},
                f"repairs of {what} are paused by {pause.by} until {pause.until}: "
                f"{pause.reason}",
                {"command": f"zeta-agent resume "
                            f"{'--all' if pause.scope == '*' else '--policy ' + pause.scope} "
                            "--operator NAME --reason '...'"}))
    for silent in state.silent:
        if owner(state.me, state.everyone - {silent.peer}, state.alive):
            alerts.append(Alert(
                "ZetaPeerSilent", "warning", {"target": f"persona/{silent.peer}"},
                silent.summary,
                {"command": f"systemctl status zeta-agent@{silent.peer}"}))
    return alerts
