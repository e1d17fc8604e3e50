"""The import walls hold: ``bus`` never imports ``runtime``; the decision core does no I/O.

import-linter checks them (contracts in pyproject.toml); this runs it as part of the suite
and proves, on a throwaway tree, that the contracts would catch a violation.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def lint_imports(cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(LINT_IMPORTS), "--no-logo", "--no-cache"], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120, check=False)


def contracts() -> list[dict[str, Any]]:
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]
    found: list[dict[str, Any]] = config["contracts"]
    return found


def module_file(root: Path, module: str) -> Path:
    """Where ``module`` lives under ``root``, with every package on the way created."""
    *packages, name = module.split(".")
    for depth in range(1, len(packages) + 1):
        package = root.joinpath(*packages[:depth])
        package.mkdir(exist_ok=True)
        (package / "__init__.py").touch()
    if not packages or root.joinpath(*packages, name).is_dir():
        return root.joinpath(*packages, name, "__init__.py")  # a package (runtime.brain)
    return root.joinpath(*packages, f"{name}.py")


def test_the_walls_are_declared() -> None:
    names = {c["name"] for c in contracts()}
    assert {"bus never imports runtime", "the decision core does no I/O",
            "the product never imports the lab or rich"} <= names


def test_the_import_contracts_are_kept() -> None:
    result = lint_imports(REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    for contract in contracts():
        assert f"{contract['name']} KEPT" in result.stdout
    assert " 0 broken." in result.stdout


def test_the_contracts_catch_a_violation(tmp_path: Path) -> None:
    # A tree with the same package names where every source module imports what it
    # must not: each contract has to break, or it is not guarding anything.
    header = "[tool.importlinter]"
    settings = (REPO / "pyproject.toml").read_text().split(header, 1)[1]
    (tmp_path / "pyproject.toml").write_text(header + settings)
    for package in ("runtime", "bus", "lab"):
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").touch()
    for contract in contracts():
        for module in contract["source_modules"]:
            path = module_file(tmp_path, module)
            path.write_text("".join(f"import {m}\n" for m in contract["forbidden_modules"]))
    for contract in contracts():
        for module in contract["forbidden_modules"]:
            # Forbidden modules of our own must exist for import-linter to check them.
            if module.split(".")[0] in ("runtime", "bus", "lab"):
                path = module_file(tmp_path, module)
                if not path.exists():
                    path.touch()
    result = lint_imports(tmp_path, env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert result.returncode == 1, result.stdout + result.stderr
    for contract in contracts():
        assert f"{contract['name']} BROKEN" in result.stdout
        for module in contract["source_modules"]:
            for forbidden in contract["forbidden_modules"]:
                assert f"{module} is not allowed to import {forbidden}" in result.stdout
