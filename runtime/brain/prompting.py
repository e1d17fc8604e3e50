"""A persona's prompt, rendered from Jinja2 templates next to its persona file.

Two templates make one prompt: ``<persona>.prompt.j2`` (usually extending
``base.prompt.j2``) is the system prompt: who the persona is, its voice, its scopes
and the actions its policies allow. ``incident.prompt.j2`` is the user message: the
findings awaiting a decision with the ladder rungs the model may pick, and the
observations. Undefined variables are errors (``StrictUndefined``), so a template
typo fails a test instead of sending a model an empty line.

Observations are trimmed to a token budget, deterministically: items about the
findings' targets come first, then the rest in snapshot order, each long string
clipped; items are taken whole while the estimate fits, and what is left out is
counted in the prompt. Tokens are estimated as ``ceil(characters / 4)``, the usual
rule of thumb for English and JSON; the API's own count (``usage``) is what the
hourly budget spends.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runtime.brain.choosing import Case, tool_name
from runtime.config.templates import INCIDENT_TEMPLATE, environment
from runtime.core.engine import Finding
from runtime.model.catalog import Action
from runtime.model.formats import Persona, RepairPolicy
from runtime.model.snapshot import Snapshot

VOTE_TEMPLATE = "vote.prompt.j2"
CLIP = 300  # characters kept of any one observed string: logs and annotations can be huge
DOMAINS = ("nodes", "events", "pods", "units", "apiserver", "peers", "leases")


def estimate_tokens(text: str) -> int:
    """Tokens ``text`` is taken to cost: one per four characters, rounded up."""
    return math.ceil(len(text) / 4)


@dataclass(frozen=True)
class Prompt:
    system: str
    user: str

    def __str__(self) -> str:
        return f"=== system ===\n{self.system}\n=== user ===\n{self.user}"


def _clip(value: Any) -> Any:
    if isinstance(value, str):
        return value if len(value) <= CLIP else f"{value[:CLIP]}… ({len(value)} chars)"
    if isinstance(value, Mapping):
        return {str(k): _clip(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clip(v) for v in value]
    return value


def compact(value: Any) -> str:
    """One line of JSON, long strings clipped: how observed data appears in a prompt."""
    return json.dumps(_clip(value), sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      default=str)


def _about(domain: str, item: Mapping[str, Any], names: set[str]) -> bool:
    """Whether an observed item concerns a finding's target (node, host, pod, unit…)."""
    if domain == "events":  # about "Kind/name"
        return str(item.get("object", "")).rpartition("/")[2] in names
    keys = {"nodes": ("name",), "pods": ("name", "node"), "units": ("name",),
            "peers": ("persona",), "leases": ("key",), "apiserver": ("path",)}[domain]
    return any(str(item.get(key)) in names for key in keys)


def trim(snapshot: Snapshot, cases: Sequence[Case], budget: int) -> dict[str, Any]:
    """The observations the prompt shows: lines, and what was left out or not observed."""
    names = {part for case in cases
             for target in (case.intent.finding.target, *(o.target for o in case.options))
             for part in (target.name, target.host, target.key) if part}
    items: list[tuple[bool, int, str]] = []
    unobserved = []
    for domain in DOMAINS:
        observed = getattr(snapshot, domain)
        if observed is None:
            unobserved.append(domain)
            continue
        for item in observed:
            data = item.model_dump(mode="json", exclude_defaults=True)
            items.append((not _about(domain, data, names), len(items),
                          f"{domain}: {compact(data)}"))
    if snapshot.health is not None:
        health = snapshot.health.model_dump(exclude_none=True)
        items.append((True, len(items), f"health: {compact(health)}"))
    kept: list[str] = []
    left = spent = 0
    for _, _, line in sorted(items):
        cost = estimate_tokens(line) + 1
        if spent + cost > budget:
            left += 1
            continue
        kept.append(line)
        spent += cost
    return {"lines": kept, "omitted": left,
            "unobserved": unobserved, "budget": budget,
            "sources": {name: s.detail or ("ok" if s.ok else "failed")
                        for name, s in sorted(snapshot.sources.items())}}


def _action(action: Action) -> dict[str, Any]:
    return {"name": action.name, "tool": tool_name(action.name), "summary": action.summary,
            "destructive": action.destructive, "min_approvals": action.min_approvals}


def _case(case: Case, policies: Mapping[str, RepairPolicy]) -> dict[str, Any]:
    finding, intent = case.intent.finding, case.intent
    remedies = policies[intent.policy].spec.remedies
    options = []
    for option in case.options:
        quorum = remedies[option.step].quorum
        options.append({
            "step": option.step, "action": option.action.name,
            "tool": tool_name(option.action.name), "destructive": option.destructive,
            "target": compact(option.target.model_dump(mode="json", exclude_none=True)),
            "params": compact(option.params.model_dump(mode="json")),
            "quorum": (f"{quorum.approvals} approvals, veto: {', '.join(quorum.veto) or 'none'}"
                       if quorum else "the fleet default" if option.destructive else "none"),
            "rules": option.step == intent.step})
    return {"ref": case.ref, "policy": intent.policy, "target": finding.target.key,
            "since": finding.since.isoformat(), "summary": finding.summary,
            "evidence": compact(dict(finding.evidence)), "options": options}


def identity(persona: Persona, actions: Iterable[Action]) -> dict[str, Any]:
    """What a system template may use: who the persona is and the actions it is offered."""
    spec = persona.spec
    return {"persona": {"name": persona.name, "display_name": spec.displayName,
                        "role": spec.role, "description": spec.description,
                        "duties": list(spec.duties), "scopes": list(spec.effective_scopes)},
            "actions": [_action(a) for a in actions]}


def context(persona: Persona, policies: Mapping[str, RepairPolicy], actions: Iterable[Action],
            *, pending: Sequence[Case], findings: Sequence[Finding], snapshot: Snapshot,
            observation_tokens: int) -> dict[str, Any]:
    """Everything a template may use; the keys are the templates' whole vocabulary."""
    deciding = {(c.intent.policy, c.intent.finding.target.key) for c in pending}
    return {
        **identity(persona, actions),
        "cases": [_case(c, policies) for c in pending],
        "others": [{"policy": f.policy, "target": f.target.key, "summary": f.summary}
                   for f in findings if (f.policy, f.target.key) not in deciding],
        "at": snapshot.at.isoformat(), "host": snapshot.host or "unknown",
        "observations": trim(snapshot, pending, observation_tokens),
    }


def render(directory: Path, template: str, variables: Mapping[str, Any], *,
           message: str = INCIDENT_TEMPLATE) -> Prompt:
    """The system prompt from ``template`` and the user message from ``message``.

    The system templates may use only ``persona`` and ``actions``: the same system
    prompt serves a deliberation (``incident.prompt.j2``) and a vote (``vote.prompt.j2``).
    """
    templates = environment(directory)
    return Prompt(templates.get_template(template).render(variables).strip() + "\n",
                  templates.get_template(message).render(variables).strip() + "\n")
