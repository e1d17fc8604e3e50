"""Authorization: may this persona carry out this intent, and does it need a quorum first?

Pure. The last word before anything acts, so every rule denies by default and each
refusal names what is missing. The rules, in order:

1. the persona must run the ``execute`` duty;
2. the action's scope on this target must be granted by the persona's effective
   scopes (its tier's preset plus its own), exactly as ``runtime.model.scopes.allows``
   reads them: no scope, no action;
3. an intent that needs a quorum (destructive, or given one by its policy) is refused
   while none can be asked for: the bus link's own refusal (bus down, resources not
   as configured, JetStream not answering, the fleet frozen) is the reason given;
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


def authorize(persona: Persona, intent: Intent, *, quorum_refusal: str | None) -> Verdict:
    """Decide whether ``persona`` may carry out ``intent`` now.

    ``quorum_refusal`` is why no quorum can be asked for right now (the bus link's
    ``refusal()``), or None when one can.
    """
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
    if needs_quorum and quorum_refusal is not None:
        what = "destructive actions need" if intent.destructive else f"{intent.action.name} needs"
        return Verdict(False, True, f"{quorum_refusal}: {what} a quorum")
    return Verdict(True, needs_quorum,
                   f"{scope} granted" + ("; needs a quorum first" if needs_quorum else ""))
