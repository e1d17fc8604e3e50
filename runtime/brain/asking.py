"""The one module that talks to the Anthropic API (official SDK, async client).

Retries are ours, not the SDK's (``max_retries=0``): the SDK would honour any
``retry-after``, however long, while a deliberation has a deadline. Only rate limits,
5xx answers and lost connections are retried, each attempt logged, never past the
deadline. Everything that goes wrong ends as ``BrainUnavailableError`` with a reason
short enough for the heartbeat; SDK exceptions never leave this module.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from runtime.brain.choosing import ToolCall
from runtime.brain.prompting import Prompt
from runtime.config.credentials import credential_path
from runtime.model.formats import AnthropicBrain, Fleet, Persona

if TYPE_CHECKING:
    # Imported where a model is asked, not here: the SDK takes longer to import than
    # the rest of the agent together, and most personas (rules brain) never need it,
    # while every start of `zeta-agent` (READY=1, each CLI call) would pay for it.
    import anthropic

log = structlog.get_logger("brain")

KEY_CREDENTIAL = "anthropic-api-key"
KEY_ENV = "ANTHROPIC_API_KEY"
BASE_URL_ENV = "ANTHROPIC_BASE_URL"
BACKOFF = 0.5  # seconds before the first retry of a 5xx or lost connection; doubles after
HOUR = 3600.0


class BrainUnavailableError(Exception):
    """The model cannot answer this time; ``str()`` is the reason the heartbeat shows."""


def api_key(persona: Persona, fleet: Fleet, environ: Mapping[str, str]) -> str | None:
    """``$CREDENTIALS_DIRECTORY/anthropic-api-key`` (or the dev credentials dir), else the env."""
    path: Path = credential_path(KEY_CREDENTIAL, persona.name, fleet, environ)
    try:
        key = path.read_text(encoding="utf-8").strip()
    except OSError:
        key = ""
    return key or environ.get(KEY_ENV, "").strip() or None


@dataclass(frozen=True)
class Reply:
    calls: tuple[ToolCall, ...]
    text: str
    input_tokens: int
    output_tokens: int
    stop_reason: str

    @property
    def tokens(self) -> int:
        """What the reply cost against the token budget: input plus output."""
        return self.input_tokens + self.output_tokens

    def check(self) -> None:
        """Raise if the reply cannot be used (its tokens are spent all the same)."""
        if self.stop_reason == "refusal":
            raise BrainUnavailableError("the model refused")
        if self.stop_reason == "max_tokens":
            # A tool call cut off mid-input cannot be trusted to mean what it says.
            raise BrainUnavailableError("malformed reply: cut off at maxTokens")


class TokenBudget:
    """Tokens spent in the trailing hour (monotonic seconds), against the persona's budget."""

    def __init__(self, per_hour: int) -> None:
        self.per_hour = per_hour
        self._spent: deque[tuple[float, int]] = deque()

    def spent(self, now: float) -> int:
        while self._spent and now - self._spent[0][0] >= HOUR:
            self._spent.popleft()
        return sum(tokens for _, tokens in self._spent)

    def record(self, now: float, tokens: int) -> None:
        self._spent.append((now, tokens))

    def refusal(self, now: float) -> str | None:
        """Why no model call may start now, or None."""
        spent = self.spent(now)
        if spent >= self.per_hour:
            return f"token budget spent: {spent}/{self.per_hour} in the last hour"
        return None


def _retry_after(exc: anthropic.APIStatusError) -> float | None:
    value = exc.response.headers.get("retry-after")
    try:
        return max(float(value), 0.0) if value is not None else None
    except ValueError:
        return None  # an HTTP date: rare from this API; back off as for a 5xx


class Model:
    """Asks one model, with this persona's deadline, retries and key."""

    def __init__(self, settings: AnthropicBrain, *, key: str, base_url: str | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self._key = key
        self._base_url = base_url
        self._clock = clock

    async def ask(self, prompt: Prompt, tools: Sequence[Mapping[str, Any]], *,
                  deadline: float) -> Reply:
        """One reply within ``deadline`` (monotonic), retrying what is worth retrying."""
        import anthropic  # noqa: PLC0415 (see the TYPE_CHECKING import)

        attempts = self.settings.retries + 1
        async with anthropic.AsyncAnthropic(api_key=self._key, base_url=self._base_url,
                                            max_retries=0) as client:
            for attempt in range(1, attempts + 1):
                left = deadline - self._clock()
                if left <= 0:
                    raise BrainUnavailableError("deadline passed before an answer")
                try:
                    message = await client.messages.create(
                        model=self.settings.model, max_tokens=self.settings.maxTokens,
                        system=prompt.system, messages=[{"role": "user", "content": prompt.user}],
                        tools=list(tools) if tools else anthropic.omit,  # type: ignore[arg-type]
                        timeout=left)
                except anthropic.APITimeoutError:
                    raise BrainUnavailableError(
                        f"timeout: no answer within {left:.1f}s") from None
                except (anthropic.RateLimitError, anthropic.InternalServerError,
                        anthropic.APIConnectionError) as exc:
                    reason, wait = self._retryable(exc, attempt)
                except anthropic.APIStatusError as exc:
                    raise BrainUnavailableError(f"HTTP {exc.status_code}: {exc.message}") from None
                else:
                    return _reply(message)
                if attempt == attempts:
                    raise BrainUnavailableError(f"{reason} ({attempts} attempts)")
                if self._clock() + wait >= deadline:
                    raise BrainUnavailableError(f"{reason}; waiting {wait:g}s more would pass "
                                                "the deadline")
                log.warning(f"attempt #{attempt}/{attempts} failed; will retry", reason=reason,
                            wait_s=wait)
                await asyncio.sleep(wait)
        raise AssertionError("unreachable: the last attempt returns or raises")

    @staticmethod
    def _retryable(exc: anthropic.APIError, attempt: int) -> tuple[str, float]:
        import anthropic  # noqa: PLC0415 (see the TYPE_CHECKING import)

        backoff = BACKOFF * 2 ** (attempt - 1)
        if isinstance(exc, anthropic.RateLimitError):
            after = _retry_after(exc)
            return (f"rate limited (retry-after {after:g}s)" if after is not None
                    else "rate limited"), backoff if after is None else after
        if isinstance(exc, anthropic.APIStatusError):
            return f"server error {exc.status_code}", backoff
        return f"connection failed: {exc}", backoff


def _reply(message: anthropic.types.Message) -> Reply:
    calls, text = [], []
    for block in message.content:
        if block.type == "tool_use":
            calls.append(ToolCall(block.id, block.name, block.input))
        elif block.type == "text":
            text.append(block.text)
    return Reply(tuple(calls), "\n".join(text).strip(), message.usage.input_tokens,
                 message.usage.output_tokens, message.stop_reason or "")
