"""``zeta-agent validate``, ``personas`` and ``version``: what the configuration says.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from runtime import __version__
from runtime.config.loading import config_paths, load
from runtime.model.formats import Persona
from runtime.ops.common import (
    EXIT_FINDINGS,
    EXIT_OK,
    UserError,
    config_dir,
    config_errors,
    is_config_dir,
    load_config_dir,
)


def validate_command(args: argparse.Namespace) -> int:
    given: list[Path] = args.paths or [config_dir(args.config_dir)]
    paths = [p for path in given
             for p in (config_paths(path) if is_config_dir(path) else [path])]
    config = load(paths, strict=False)
    where = " ".join(map(str, given))
    errors = sorted(config.errors)
    empty = not config.personas and not config.policies and config.fleet_file is None
    if args.json:
        problems = [asdict(e) for e in errors]
        if empty and not errors:
            problems.append({"file": where, "line": 0, "field": "",
                             "message": "no persona, policy or fleet files"})
        print(json.dumps({"ok": not problems, "personas": sorted(config.personas),
                          "policies": sorted(config.policies), "fleet": config.fleet_file,
                          "errors": problems}, indent=2))
        return EXIT_FINDINGS if problems else EXIT_OK
    if errors:
        raise config_errors(errors, where, code=EXIT_FINDINGS)
    if empty:
        raise UserError(f"no persona, policy or fleet files under {where}", code=EXIT_FINDINGS)
    fleet = config.fleet_file or "built-in defaults"
    print(f"ok: {len(config.personas)} personas, {len(config.policies)} policies, "
          f"fleet: {fleet}")
    return EXIT_OK


def personas_command(args: argparse.Namespace) -> int:
    directory = config_dir(args.config_dir)
    personas = [located.value for _, located in
                sorted(load_config_dir(directory).personas.items())]
    if args.json:
        print(json.dumps([_persona_json(p) for p in personas], indent=2))
    else:
        print(personas_table(personas), end="")
    return 0


def _persona_json(persona: Persona) -> dict[str, object]:
    spec = persona.spec
    return {"name": persona.name, "displayName": spec.displayName, "role": spec.role,
            "tier": spec.tier.value, "duties": list(spec.duties), "scopes": list(spec.scopes),
            "effectiveScopes": list(spec.effective_scopes), "policies": list(spec.policies),
            "tick": spec.tick.total_seconds()}


def personas_table(personas: Sequence[Persona]) -> str:
    """Name, role, tier, duties and the persona's own scopes (one per line) on top of its tier."""
    header = ["NAME", "ROLE", "TIER", "DUTIES", "SCOPES (beyond the tier)"]
    rows: list[list[str]] = []
    for persona in personas:
        spec = persona.spec
        scopes = list(spec.scopes) or ["-"]
        rows.append([persona.name, spec.role, spec.tier.value, ",".join(spec.duties), scopes[0]])
        rows.extend(["", "", "", "", scope] for scope in scopes[1:])
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(4)]
    return "".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row[:4], widths, strict=True))
        + "  " + row[4] + "\n"
        for row in [header, *rows])


def version_command(_args: argparse.Namespace) -> int:
    print(f"zeta-agent {__version__}")
    return 0
