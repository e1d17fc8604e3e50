"""``zeta-agent think``: ask a persona's model brain about a recorded incident; acts on nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys

from pydantic import ValidationError

from runtime.agent import deliberating, logs
from runtime.brain import choosing
from runtime.brain.asking import BrainUnavailableError
from runtime.model.formats import AnthropicBrain
from runtime.model.snapshot import Snapshot
from runtime.ops.common import UserError, config_dir, load_config_dir, persona_in


def think_command(args: argparse.Namespace) -> int:
    directory = config_dir(args.config_dir)
    config = load_config_dir(directory)
    persona = persona_in(config, args.persona, directory)
    try:
        snapshot = Snapshot.model_validate_json(args.incident.read_bytes())
    except (OSError, ValidationError) as exc:
        raise UserError(f"{args.incident}: not an incident (an observation Snapshot as "
                        f"JSON, see docs/examples/): {exc}") from None
    brain = persona.spec.brain
    settings = brain if isinstance(brain, AnthropicBrain) else AnthropicBrain(kind="anthropic")
    if args.model:
        settings = settings.model_copy(update={"model": args.model})
    # Log lines (discards, retries) go to stderr: stdout is the answer, maybe JSON.
    logs.configure("console", level="warning", stream=sys.stderr)
    thinker = deliberating.thinker_for(config, persona.name, os.environ, settings=settings)
    assert thinker is not None  # settings is an AnthropicBrain
    evaluation = deliberating.replay(snapshot, config.policies_of(persona),
                                     default_quorum=config.fleet.spec.quorum)
    pending = choosing.cases(evaluation.intents, thinker.policies, snapshot.host or None)
    if not pending:
        print(json.dumps({"candidates": [], "discarded": []}) if args.json else
              f"no finding awaits a decision in {args.incident} under {persona.name}'s policies")
        return 0
    if args.show_prompt:
        print(thinker.prompt(pending, evaluation.findings, snapshot), file=sys.stderr
              if args.json else sys.stdout)
    try:
        result = asyncio.run(thinker.think(pending, evaluation.findings, snapshot))
    except BrainUnavailableError as exc:
        raise UserError(f"the model is unavailable ({exc}); the rules brain would decide",
                        code=1) from None
    answer = deliberating.summary(result, pending)
    if args.json:
        print(json.dumps(answer, indent=2, default=str))
        return 0
    for item in answer["candidates"]:
        print(f"candidate {item['finding']}: {item['action']} on {item['target']} "
              f"(step {item['step']} of {item['policy']}): {item['rationale']}")
    for item in answer["discarded"]:
        print(f"discarded {item['tool']} ({item['kind']}): {item['reason']}")
    for item in answer["rules_step_stands"]:
        print(f"no candidate for {item['finding']}: the rules step stands, {item['action']} on "
              f"{item['target']} (step {item['step']} of {item['policy']})")
    return 0
