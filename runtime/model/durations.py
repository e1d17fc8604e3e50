"""Durations written the way operators write them in Prometheus rules: ``15s``, ``2m``."""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Annotated, Any

from pydantic import BeforeValidator, PlainSerializer

_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
# Longer than any window, cooldown or deadline means anything, and short enough that
# `now + duration` stays a valid datetime (a bigger one would crash the agent later).
MAX_DURATION = timedelta(days=3650)


def parse_duration(text: str) -> timedelta:
    """Parse ``1h30m``-style text; raise ValueError saying what was expected."""
    text = text.strip()
    pos, total, previous = 0, 0.0, float("inf")
    while pos < len(text):
        match = _PART.match(text, pos)
        # Units must go from large to small, each at most once: `5s1h` or `1m1m` is
        # more likely a typo than a duration anyone meant.
        if match is None or _UNIT_SECONDS[match.group(2)] >= previous:
            break
        previous = _UNIT_SECONDS[match.group(2)]
        total += float(match.group(1)) * previous
        pos = match.end()
    if not text or pos != len(text):
        raise ValueError(
            f"expected a duration like 500ms, 15s, 2m, 1h30m or 1d, got {text!r}"
        )
    if total > MAX_DURATION.total_seconds():
        raise ValueError(f"{text!r} is longer than the longest duration allowed, "
                         f"{format_duration(MAX_DURATION)} (ten years)")
    return timedelta(seconds=total)


def format_duration(value: timedelta) -> str:
    """The shortest text that parses back to ``value`` (to the millisecond)."""
    millis = round(value.total_seconds() * 1000)
    if millis == 0:
        return "0s"
    out = []
    for unit, size in (("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1000)):
        count, millis = divmod(millis, size)
        if count:
            out.append(f"{count}{unit}")
    if millis:
        out.append(f"{millis}ms")
    return "".join(out)


def _coerce(value: Any) -> Any:
    if isinstance(value, str):
        return parse_duration(value)
    if isinstance(value, bool):  # bool is an int; `for: yes` is a mistake, not one second
        raise ValueError("expected a duration like 15s or 2m, got a boolean")
    if isinstance(value, int | float):
        raise ValueError(f"expected a duration with a unit like {value}s, got a bare number")
    return value


Duration = Annotated[
    timedelta,
    BeforeValidator(_coerce),
    PlainSerializer(format_duration, return_type=str),
]
"""A pydantic field type: accepts ``15s``-style text, serializes back to it."""
