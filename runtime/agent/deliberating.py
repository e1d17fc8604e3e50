"""Deliberation: the model weighs the findings awaiting a decision, off the tick's path.

The agent's tick never awaits the model. For the intents the engine offers, the
``Deliberator`` starts one task (with the brain's deadline) and holds those intents
back; the engine keeps them offered, so their budget slots stay taken and nothing
else is offered for those targets meanwhile. A later tick collects the answer: each
validated candidate replaces its finding's intent through ``PolicyEngine.substitute``
(same budgets, then the same authorization and quorum as any intent), a finding the
model left alone keeps the rules step, and a failed deliberation hands every intent
back unchanged: the rules brain decides. The watchdog only watches ticks, which
never wait here, so a slow model cannot stop the agent from being fed.

The model can move a finding to another rung of its ladder and say why; it cannot
stop the ladder, invent a rung, or act.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import structlog

from bus.messages import Proposal
from runtime.agent.metrics import Metrics
from runtime.brain.asking import (
    BASE_URL_ENV,
    BrainUnavailableError,
    Model,
    Reply,
    TokenBudget,
    api_key,
)
from runtime.brain.choosing import (
    Case,
    Choice,
    Discard,
    allowed_actions,
    cases,
    choose,
    tool_definition,
)
from runtime.brain.prompting import VOTE_TEMPLATE, Prompt, context, identity, render
from runtime.config.loading import ConfigSet
from runtime.core.engine import Evaluation, Finding, Intent, PolicyEngine
from runtime.model.formats import AnthropicBrain, Persona, Quorum, RepairPolicy
from runtime.model.snapshot import Snapshot

log = structlog.get_logger("brain")

ARGUMENT_CHARS = 2000  # a vote's model-written argument is read by people, not parsed


@dataclass(frozen=True)
class Deliberation:
    prompt: Prompt
    reply: Reply
    choice: Choice


def _log_discard(discard: Discard) -> None:
    log.warning("candidate discarded", tool=discard.call.name, call=discard.call.id,
                kind=discard.kind, reason=discard.reason)


class Thinker:
    """One persona's model brain: render, ask within the deadline, spend the budget, validate."""

    def __init__(self, persona: Persona, policies: Sequence[RepairPolicy],
                 settings: AnthropicBrain, *, templates: Path, key: Callable[[], str | None],
                 base_url: str | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 metrics: Metrics | None = None) -> None:
        self.persona = persona
        self.metrics = metrics or Metrics.of(persona)
        self.settings = settings
        self.policies: Mapping[str, RepairPolicy] = {p.name: p for p in policies}
        self.actions = allowed_actions(policies)
        self.tools = [tool_definition(action) for action in self.actions]
        self.budget = TokenBudget(settings.tokenBudgetPerHour)
        self._templates = templates
        self._key = key
        self._base_url = base_url
        self._clock = clock

    @property
    def timeout(self) -> float:
        return self.settings.timeout.total_seconds()

    def refusal(self) -> str | None:
        """Why no deliberation can start now (no key, budget spent), or None."""
        if self._key() is None:
            return ("no API key: neither $CREDENTIALS_DIRECTORY/anthropic-api-key nor "
                    "$ANTHROPIC_API_KEY")
        return self.budget.refusal(self._clock())

    def prompt(self, pending: Sequence[Case], findings: Sequence[Finding],
               snapshot: Snapshot) -> Prompt:
        """The prompt a deliberation over ``pending`` sends."""
        variables = context(self.persona, self.policies, self.actions, pending=pending,
                            findings=findings, snapshot=snapshot,
                            observation_tokens=self.settings.observationTokens)
        return render(self._templates, self.settings.template(self.persona.name), variables)

    async def _ask(self, prompt: Prompt, tools: Sequence[Mapping[str, Any]],
                   within: float) -> Reply:
        if (reason := self.refusal()) is not None:
            self.metrics.model_call("refused")
            raise BrainUnavailableError(reason)
        key = self._key()
        assert key is not None  # refusal() said so
        model = Model(self.settings, key=key, base_url=self._base_url, clock=self._clock)
        try:
            # The SDK's own timeout covers each request; this covers everything else
            # (a retry wait, a stuck connection pool) so the deadline is a deadline.
            async with asyncio.timeout(within):
                reply = await model.ask(prompt, tools, deadline=self._clock() + within)
        except TimeoutError:
            self.metrics.model_call("failed")
            raise BrainUnavailableError(f"timeout: no answer within {within:g}s") from None
        except BrainUnavailableError:
            self.metrics.model_call("failed")
            raise
        self.budget.record(self._clock(), reply.tokens)
        outcome = "ok"
        try:
            reply.check()
        except BrainUnavailableError:
            outcome = "unusable"  # its tokens are spent all the same
            raise
        finally:
            self.metrics.model_call(outcome, input_tokens=reply.input_tokens,
                                    output_tokens=reply.output_tokens)
        return reply

    async def think(self, pending: Sequence[Case], findings: Sequence[Finding],
                    snapshot: Snapshot) -> Deliberation:
        """Ask the model about ``pending``; raises ``BrainUnavailableError`` on any failure."""
        prompt = self.prompt(pending, findings, snapshot)
        reply = await self._ask(prompt, self.tools, self.timeout)
        choice = choose(reply.calls, pending, self.persona)
        for discard in choice.discards:
            _log_discard(discard)
        log.info("deliberated", model=self.settings.model, tokens=reply.tokens,
                 candidates=[f"{c.case.ref}:{c.option.action.name}@{c.option.target.key}"
                             for c in choice.candidates], discarded=len(choice.discards))
        return Deliberation(prompt, reply, choice)

    async def argue(self, proposal: Proposal, verdict: str, reason: str, *,
                    within: float) -> str:
        """A model-written argument for a verdict already reached; "" if there is none.

        The verdict is never the model's: this only puts words to it.
        """
        variables = {**identity(self.persona, self.actions),
                     "proposal": proposal.model_dump(mode="json"), "verdict": verdict,
                     "reason": reason}
        prompt = render(self._templates, self.settings.template(self.persona.name), variables,
                        message=VOTE_TEMPLATE)
        try:
            reply = await self._ask(prompt, (), min(self.timeout, within))
        except BrainUnavailableError as exc:
            log.info("vote argued without the model", reason=str(exc))
            return ""
        return reply.text[:ARGUMENT_CHARS]


@dataclass
class _Pending:
    cases: tuple[Case, ...]
    task: asyncio.Task[Deliberation]
    deadline: float


class Deliberator:
    """Between the engine and the agent's acting: which intents to carry out this tick."""

    def __init__(self, thinker: Thinker, engine: PolicyEngine, *,
                 clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], datetime]) -> None:
        self.thinker = thinker
        self.engine = engine
        self._clock = clock
        self._wall = wall
        self._pending: list[_Pending] = []
        self.status = f"brain: anthropic ({thinker.settings.model})"

    def _fall_back(self, reason: str) -> None:
        status = f"brain: rules (anthropic unavailable: {reason})"
        if status != self.status:
            log.warning("rules brain decides", reason=reason)
        self.status = status

    def decide(self, evaluation: Evaluation, snapshot: Snapshot) -> list[Intent]:
        """The intents to carry out now; new ones wait here for the model's answer."""
        ready: list[Intent] = []
        for pending in list(self._pending):
            if pending.task.done():
                self._pending.remove(pending)
                ready += self._resolve(pending)
            elif self._clock() >= pending.deadline:
                # asking() has its own deadline; this only guards against a task that
                # does not honour it, so its intents are never held forever.
                pending.task.cancel()
                self._pending.remove(pending)
                self._fall_back(f"timeout: no answer within {self.thinker.timeout:g}s")
                ready += [case.intent for case in pending.cases]
        if evaluation.intents:
            if (reason := self.thinker.refusal()) is not None:
                self._fall_back(reason)
                ready += evaluation.intents
            else:
                pending_cases = cases(evaluation.intents, self.thinker.policies,
                                      snapshot.host or None)
                task = asyncio.create_task(
                    self.thinker.think(pending_cases, evaluation.findings, snapshot),
                    name=f"deliberation:{len(pending_cases)}")
                self._pending.append(_Pending(pending_cases, task,
                                              self._clock() + self.thinker.timeout))
        open_now = {(f.policy, f.target.key) for f in evaluation.findings}
        carry = []
        for intent in ready:
            if (intent.policy, intent.finding.target.key) in open_now:
                carry.append(intent)
            else:
                self.engine.refused(intent.id, self._wall(),
                                    "the finding cleared while the brain deliberated")
        return carry

    def _resolve(self, pending: _Pending) -> list[Intent]:
        rules = [case.intent for case in pending.cases]
        if pending.task.cancelled():
            self._fall_back("deliberation cancelled")
            return rules
        error = pending.task.exception()
        if isinstance(error, BrainUnavailableError):
            self._fall_back(str(error))
            return rules
        if error is not None:
            log.error("deliberation failed", exc_info=error)
            self._fall_back(f"{type(error).__name__}: {error}")
            return rules
        choice = pending.task.result().choice
        self.status = (f"brain: anthropic ({self.thinker.settings.model}), last answer: "
                       f"{len(choice.candidates)} picked, {len(choice.discards)} discarded")
        picked = {candidate.case.ref: candidate for candidate in choice.candidates}
        out = []
        for case in pending.cases:
            candidate = picked.get(case.ref)
            if candidate is None:
                log.info("no candidate: the rules step stands", finding=case.ref,
                         policy=case.intent.policy, target=case.intent.target.key)
                out.append(case.intent)
                continue
            chosen = self.engine.substitute(
                case.intent.id, step=candidate.option.step, target=candidate.option.target,
                rationale=candidate.rationale, at=self._wall())
            if isinstance(chosen, str):
                log.warning("candidate discarded", tool=candidate.call.name,
                            call=candidate.call.id, kind="engine", reason=chosen)
                out.append(case.intent)
            else:
                out.append(chosen)
        return out

    @property
    def running(self) -> tuple[asyncio.Task[Deliberation], ...]:
        """Deliberations not yet collected (for ``--once`` runs and tests to wait on)."""
        return tuple(pending.task for pending in self._pending)

    def close(self) -> None:
        """Cancel deliberations still running (the agent is stopping)."""
        for pending in self._pending:
            pending.task.cancel()
        self._pending.clear()


def thinker_for(config: ConfigSet, persona_name: str, environ: Mapping[str, str], *,
                settings: AnthropicBrain | None = None,
                metrics: Metrics | None = None) -> Thinker | None:
    """The persona's model brain, or None when it runs the rules brain.

    ``settings`` overrides the persona file's (``zeta-agent think`` on a persona whose
    brain is still ``rules``). Templates are read next to the persona file; the key
    is looked up at every deliberation, so adding one needs no restart.
    """
    located = config.personas[persona_name]
    persona = located.value
    brain = settings or persona.spec.brain
    if not isinstance(brain, AnthropicBrain):
        return None
    return Thinker(persona, config.policies_of(persona), brain,
                   templates=Path(located.file).parent,
                   key=lambda: api_key(persona, config.fleet, environ),
                   base_url=environ.get(BASE_URL_ENV) or None, metrics=metrics)


def replay(snapshot: Snapshot, policies: Sequence[RepairPolicy], *,
           default_quorum: Quorum) -> Evaluation:
    """The engine's evaluation of a recorded snapshot, taken to have held long enough.

    A fresh engine sees the snapshot twice: first backdated by the longest ``for:``
    of the policies, then as recorded, so every finding the snapshot shows is open
    and its first step offered, exactly as a running agent would offer it.
    """
    engine = PolicyEngine(policies, default_quorum=default_quorum)
    longest = max((p.spec.detect.for_ for p in policies), default=timedelta(0))
    engine.evaluate(snapshot.model_copy(update={"at": snapshot.at - longest}))
    return engine.evaluate(snapshot)


def _step(case: Case, step: int) -> dict[str, Any]:
    option = next(o for o in case.options if o.step == step)
    return {"finding": case.ref, "policy": case.intent.policy,
            "finding_target": case.intent.finding.target.key, "step": step,
            "action": option.action.name, "target": option.target.key,
            "params": option.params.model_dump(mode="json"), "destructive": option.destructive}


def summary(deliberation: Deliberation, pending: Sequence[Case]) -> dict[str, Any]:
    """What ``zeta-agent think`` prints: candidates, discards, and where the rules step stands."""
    choice = deliberation.choice
    picked = {c.case.ref for c in choice.candidates}
    return {
        "candidates": [{**_step(c.case, c.option.step), "rationale": c.rationale}
                       for c in choice.candidates],
        "discarded": [{"tool": d.call.name, "input": d.call.input, "kind": d.kind,
                       "reason": d.reason} for d in choice.discards],
        "rules_step_stands": [_step(case, case.intent.step) for case in pending
                              if case.ref not in picked],
        "text": deliberation.reply.text,
        "tokens": deliberation.reply.tokens,
    }
