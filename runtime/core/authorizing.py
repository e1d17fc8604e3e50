"""Authorization: may this persona carry out this intent, and does it need a quorum first?

Pure. The last word before anything acts, so every rule denies by default and each
refusal names what is missing. The rules, in order:

1. the persona must run the ``execute`` duty;
2. the action's scope on this target must be granted by the persona's effective
   scopes (its tier's preset plus its own), exactly as ``runtime.model.scopes.allows``
   reads them: no scope, no action;
3. an intent that needs a quorum (destructive, or given one by its policy) is refused
   while the bus is down (no quorum can be asked for) or the fleet is frozen;
4. otherwise it is allowed, and ``needs_quorum`` says whether the votes come first.
"""

from __future__ import annotations

from dataclasses import dataclass

from runtime.core.engine import Intent
from runtime.model.formats import Persona
from runtime.model.scopes import ScopeError, allows


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    needs_quorum: bool
    reason: str


def authorize(persona: Persona, intent: Intent, *, bus_connected: bool, frozen: bool) -> Verdict:
    """Decide whether ``persona`` may carry out ``intent`` now."""
    needs_quorum = intent.destructive or intent.quorum is not None
    if "execute" not in persona.spec.duties:
        return Verdict(False, needs_quorum,
                       f"{persona.name} does not execute repairs (duties: "
                       f"{', '.join(persona.spec.duties)})")
    try:
        scope = intent.action.scope_for(intent.target, intent.params)
        granted = allows(persona.spec.effective_scopes, scope)
    except ScopeError as exc:
        # A target whose name cannot even be written as a scope is never granted.
        return Verdict(False, needs_quorum, f"no scope can grant this target: {exc}")
    if not granted:
        return Verdict(False, needs_quorum,
                       f"scope {scope} is not granted to {persona.name} "
                       f"({intent.action.name} on {intent.target.key})")
    if needs_quorum and not bus_connected:
        what = "destructive actions need" if intent.destructive else f"{intent.action.name} needs"
        return Verdict(False, True, f"bus down: {what} a quorum")
    if needs_quorum and frozen:
        return Verdict(False, True, "fleet frozen: no action that needs a quorum runs until thawed")
    return Verdict(True, needs_quorum,
                   f"{scope} granted" + ("; needs a quorum first" if needs_quorum else ""))
