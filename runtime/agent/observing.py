"""Observing: the observers of one agent, run together into one typed ``Snapshot``.

Each observer owns some of the snapshot's domains (``units``, ``health``, …) and no
two observers share one. They run concurrently, each under its own timeout; an
observer that fails or times out leaves its domains ``None`` ("not observed", never
"nothing wrong") and says why in ``snapshot.sources``.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Sequence
from datetime import datetime

import structlog

from runtime.core import review
from runtime.core.ports import DOMAINS, Contribution, Domain, Observed, Observer
from runtime.model.snapshot import Snapshot, SourceStatus

log = structlog.get_logger()


class Observing:
    """A set of observers with disjoint domains, run together into one snapshot."""

    def __init__(self, observers: Sequence[Observer], *, timeout: float,
                 host: str | None = None) -> None:
        owners: dict[str, str] = {}
        for observer in observers:
            for domain in observer.provides:
                if domain in owners:
                    raise ValueError(f"observers {owners[domain]!r} and {observer.name!r} "
                                     f"both provide {domain!r}")
                owners[domain] = observer.name
        if len({o.name for o in observers}) != len(observers):
            raise ValueError("two observers share a name")
        self.observers = tuple(observers)
        self.timeout = timeout
        self.host = socket.gethostname() if host is None else host
        # The last API server outage any snapshot saw: a veto holder's review reads it
        # to tell nodes gone NotReady from an observer that could not see them.
        self.outage: review.Outage | None = None

    @property
    def unobserved(self) -> tuple[Domain, ...]:
        """Domains no observer provides: they are None in every snapshot."""
        covered = {d for o in self.observers for d in o.provides}
        return tuple(d for d in DOMAINS if d not in covered)

    async def snapshot(self, now: datetime) -> Snapshot:
        """Run every observer concurrently, each under the timeout, and merge the results."""
        results = await asyncio.gather(*(self._one(o, now) for o in self.observers))
        merged: Contribution = {}
        sources: dict[str, SourceStatus] = {}
        for observer, result in zip(self.observers, results, strict=True):
            sources[observer.name] = result.status
            if not result.data.keys() <= observer.provides:
                sources[observer.name] = SourceStatus(
                    ok=False, detail=f"filled domains it does not provide: "
                                     f"{sorted(result.data.keys() - observer.provides)}")
                continue
            merged.update(result.data)
        snapshot = Snapshot(at=now, host=self.host, sources=sources, **merged)
        self.outage = review.remember(self.outage, now, review.reachable(snapshot.apiserver))
        return snapshot

    async def _one(self, observer: Observer, now: datetime) -> Observed:
        try:
            async with asyncio.timeout(self.timeout):
                return await observer.observe(now)
        except TimeoutError:
            detail = f"timed out after {self.timeout:g}s"
        except Exception as exc:
            # A broken observer costs its own domains, not the tick.
            log.exception("observer failed", observer=observer.name)
            detail = f"{type(exc).__name__}: {exc}"
        return Observed({}, SourceStatus(ok=False, detail=detail))
