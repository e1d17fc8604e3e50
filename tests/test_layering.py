"""The import walls hold: ``bus`` never imports ``runtime``; the decision core does no I/O.

import-linter checks them (contracts in pyproject.toml); this runs it as part of the suite
and proves, on a throwaway tree, that the contracts would catch a violation.
"""

from __future__ import annotations

import itertools
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


def forbidding() -> list[dict[str, Any]]:
    return [c for c in contracts() if c["type"] == "forbidden"]


def layers() -> dict[str, Any]:
    [contract] = [c for c in contracts() if c["type"] == "layers"]
    return contract


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
            "the product never imports the lab or rich", "the rooms are layered",
            "model and core do no I/O", "kubernetes is imported only in runtime.kube",
            "nats is imported only in bus", "anthropic is imported only in runtime.brain.asking",
            "only the wiring knows the concrete actuators", "the brain never acts"} <= names
    assert {c["type"] for c in contracts()} == {"forbidden", "layers"}


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
    for contract in forbidding():
        for module in contract["source_modules"]:
            with module_file(tmp_path, module).open("a") as source:  # several contracts
                source.write("".join(f"import {m}\n" for m in contract["forbidden_modules"]))
    for contract in forbidding():
        for module in contract["forbidden_modules"]:
            # Forbidden modules of our own must exist for import-linter to check them.
            if module.split(".")[0] in ("runtime", "bus", "lab"):
                path = module_file(tmp_path, module)
                if not path.exists():
                    path.touch()
    result = lint_imports(tmp_path, env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert result.returncode == 1, result.stdout + result.stderr
    for contract in forbidding():
        assert f"{contract['name']} BROKEN" in result.stdout
        for module in contract["source_modules"]:
            for forbidden in contract["forbidden_modules"]:
                assert f"{module} is not allowed to import {forbidden}" in result.stdout


def _rooms(contract: dict[str, Any]) -> list[list[str]]:
    return [[room.strip() for room in layer.split("|")] for layer in contract["layers"]]


def test_the_rooms_are_every_package_under_runtime() -> None:
    contract = layers()
    placed = {room for layer in _rooms(contract) for room in layer}
    present = {p.name for p in (REPO / "runtime").iterdir()
               if (p / "__init__.py").exists() or (p.suffix == ".py" and p.stem != "__init__")}
    assert present - {"__main__.py"} == placed, present ^ placed
    assert contract["exhaustive"] is True


def test_the_layers_contract_catches_upward_sideways_and_unplaced(tmp_path: Path) -> None:
    """A tree of the same rooms where each room imports the room above it and its first
    sibling imports the next, plus a room nobody placed: every one is reported."""
    contract = layers()
    header = "[tool.importlinter]"
    (tmp_path / "pyproject.toml").write_text(
        header + "\nroot_packages = [\"runtime\"]\n\n[[tool.importlinter.contracts]]\n"
        + "".join(f"{key} = {value!r}\n".replace("'", '"').replace("True", "true")
                  for key, value in contract.items()))
    rooms = _rooms(contract)
    imports: dict[str, list[str]] = {room: [] for layer in rooms for room in layer}
    expected = []
    for higher, lower in itertools.pairwise(rooms):
        for room in lower:  # upward: every lower room imports a higher one
            imports[room].append(higher[0])
            expected.append(f"runtime.{room} is not allowed to import runtime.{higher[0]}")
    for layer in rooms:
        for left, right in itertools.pairwise(layer):  # sideways
            imports[left].append(right)
            expected.append(f"runtime.{left} is not allowed to import runtime.{right}")
    (tmp_path / "runtime").mkdir()
    (tmp_path / "runtime" / "__init__.py").touch()
    (tmp_path / "runtime" / "__main__.py").touch()
    for room, targets in [*imports.items(), ("unplaced", [])]:
        module_file(tmp_path, f"runtime.{room}.x").write_text(
            "".join(f"import runtime.{t}.x\n" for t in targets))
    result = lint_imports(tmp_path, env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"{contract['name']} BROKEN" in result.stdout
    for line in expected:
        assert line in result.stdout, (line, result.stdout)
    assert "- runtime.unplaced" in result.stdout, result.stdout
