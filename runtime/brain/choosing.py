"""Catalog actions as model tools, and a reply's tool calls validated into candidates.

Pure: no I/O, no SDK. The model only ever picks a *rung of a ladder an operator
wrote*: a call names a catalog action, a target and params; it becomes a candidate
only if the action is in the catalog, the params are well-formed, the persona's
scopes grant it, a remedy of the finding's policy has exactly that action and those
params, and the target is the one that remedy acts on for an open finding awaiting a
decision. Everything else is discarded with the reason. A candidate then goes through
the same engine budgets, authorization and quorum as the rules brain's intent.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from bus.messages import Target
from runtime.core.engine import Intent
from runtime.core.targets import action_target
from runtime.model.catalog import CATALOG, Action, Params, lookup
from runtime.model.formats import Persona, RepairPolicy
from runtime.model.scopes import ScopeError, allows

P = TypeVar("P", bound=Params)


class ToolInput(BaseModel, Generic[P]):
    """What the model must send to call one catalog action (its tool's input schema)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    target: Target = Field(description="Exactly one of the targets listed for the finding.")
    params: P
    rationale: str = Field(min_length=1, max_length=1000,
                           description="Why this step, in a few sentences; it goes on the bus.")


def tool_name(action: str) -> str:
    """``k8s.node.cordon`` → ``k8s_node_cordon``: the API allows no dots in tool names."""
    return action.replace(".", "_")


ACTIONS_BY_TOOL: Mapping[str, str] = {tool_name(name): name for name in CATALOG}


def allowed_actions(policies: Iterable[RepairPolicy]) -> tuple[Action, ...]:
    """The catalog actions the persona's policies use, by name: all it is offered as tools."""
    names = {remedy.action for policy in policies for remedy in policy.spec.remedies}
    return tuple(lookup(name) for name in sorted(names))


def tool_definition(action: Action) -> dict[str, Any]:
    """One Messages API tool: name, description and the JSON Schema of its input."""
    destructive = ("Destructive: it runs only after a quorum of agents approves it."
                   if action.destructive else "Not destructive.")
    return {"name": tool_name(action.name),
            "description": f"{action.name}: {action.summary} {destructive}",
            "input_schema": input_model(action).model_json_schema()}


def input_model(action: Action) -> type[ToolInput[Any]]:
    """``ToolInput`` specialised to the action's params model (pydantic caches each one)."""
    return ToolInput[action.params]  # type: ignore[name-defined]


# ---------------------------------------------------------------- what is being decided


@dataclass(frozen=True)
class Option:
    """One rung of a finding's ladder the model may pick, with the target it acts on."""

    step: int
    action: Action
    params: Params
    target: Target
    destructive: bool


@dataclass(frozen=True)
class Case:
    """One open finding whose next step awaits a decision; ``intent`` is the rules brain's."""

    ref: str
    intent: Intent
    options: tuple[Option, ...]


def cases(intents: Sequence[Intent], policies: Mapping[str, RepairPolicy],
          host: str | None) -> tuple[Case, ...]:
    """The decisions one deliberation covers: every rung of each intent's ladder that applies."""
    out = []
    for number, intent in enumerate(intents, 1):
        options = []
        for step, remedy in enumerate(policies[intent.policy].spec.remedies):
            action, params = lookup(remedy.action), remedy.typed_params()
            target = action_target(action, params, intent.finding.target, host)
            if isinstance(target, Target):
                options.append(Option(step, action, params, target, remedy.is_destructive))
        out.append(Case(f"F{number}", intent, tuple(options)))
    return tuple(out)


# ---------------------------------------------------------------- the model's answer


@dataclass(frozen=True)
class ToolCall:
    """A ``tool_use`` block as received, before any validation."""

    id: str
    name: str
    input: object


DiscardKind = Literal["not-in-catalog", "malformed-params", "outside-scopes",
                      "not-in-policies", "unknown-target", "duplicate"]


@dataclass(frozen=True)
class Discard:
    call: ToolCall
    kind: DiscardKind
    reason: str


@dataclass(frozen=True)
class Candidate:
    """A validated pick: ``option`` of ``case``, with the model's rationale."""

    call: ToolCall
    case: Case
    option: Option
    rationale: str


@dataclass(frozen=True)
class Choice:
    candidates: tuple[Candidate, ...]
    discards: tuple[Discard, ...]


def _errors(exc: ValidationError) -> str:
    return "; ".join(f"{'.'.join(map(str, e['loc'])) or 'input'}: {e['msg']}"
                     for e in exc.errors())


def choose(calls: Sequence[ToolCall], pending: Sequence[Case], persona: Persona) -> Choice:
    """Validate every tool call; the first valid one per case wins, later ones are discarded."""
    candidates: list[Candidate] = []
    discards: list[Discard] = []
    for call in calls:
        picked = _validate(call, pending, persona)
        if isinstance(picked, Discard):
            discards.append(picked)
        elif any(c.case.ref == picked.case.ref for c in candidates):
            discards.append(Discard(call, "duplicate", f"{picked.case.ref} already has a "
                                                       "candidate; one step per finding"))
        else:
            candidates.append(picked)
    return Choice(tuple(candidates), tuple(discards))


def _validate(call: ToolCall, pending: Sequence[Case], persona: Persona) -> Candidate | Discard:
    name = ACTIONS_BY_TOOL.get(call.name)
    if name is None:
        return Discard(call, "not-in-catalog", f"{call.name!r} is not a catalog action")
    action = lookup(name)
    try:
        given = input_model(action).model_validate(call.input)
    except ValidationError as exc:
        return Discard(call, "malformed-params", _errors(exc))
    try:
        scope = action.scope_for(given.target, given.params)
        granted = allows(persona.spec.effective_scopes, scope)
    except ScopeError as exc:
        return Discard(call, "outside-scopes", f"no scope can grant this target: {exc}")
    if not granted:
        return Discard(call, "outside-scopes",
                       f"{scope} is not granted to {persona.name} ({name} on {given.target.key})")
    rungs = [(case, option) for case in pending for option in case.options
             if option.action.name == name]
    if not rungs:
        policies = ", ".join(sorted({case.intent.policy for case in pending}))
        return Discard(call, "not-in-policies",
                       f"no remedy of {policies or 'any finding awaiting a decision'} is {name}")
    rungs = [(case, option) for case, option in rungs if option.params == given.params]
    if not rungs:
        return Discard(call, "not-in-policies",
                       f"params {given.params.model_dump(mode='json')} are not those of any "
                       f"{name} remedy of the findings awaiting a decision")
    for case, option in rungs:
        if option.target == given.target:
            return Candidate(call, case, option, given.rationale)
    return Discard(call, "unknown-target",
                   f"{given.target.key} is not what {name} acts on for any finding awaiting "
                   "a decision")
