"""The Nix expressions: they parse (``nix-instantiate --parse``, Debian's nix-bin), have the
arguments NixOS and callPackage pass, and agree with the files they build from.

The module is also evaluated with the real nixpkgs ``lib``, its assertions checked and
its build scripts run: tests/test_nix_module.py.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

from tests.prereq import missing

REPO = Path(__file__).resolve().parent.parent
NIX = REPO / "nix"


def _nix_instantiate(*args: str) -> str:
    tool = shutil.which("nix-instantiate")
    if tool is None:
        missing("nix-instantiate is not installed (Debian package nix-bin)")
    result = subprocess.run([tool, *args], capture_output=True, text=True, timeout=120,
                            check=False, cwd=REPO)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.parametrize("name", ["module.nix", "package.nix"])
def test_parses(name: str) -> None:
    assert _nix_instantiate("--parse", str(NIX / name)).strip()


@pytest.mark.parametrize(("name", "arguments"), [
    ("module.nix", "{ config = false; lib = false; pkgs = false; }"),
    ("package.nix", "{ lib = false; nats-server = false; python3Packages = false; }"),
])
def test_takes_the_arguments_it_is_given(name: str, arguments: str) -> None:
    out = _nix_instantiate("--eval", "--strict", "-E",
                           f"builtins.functionArgs (import ./nix/{name})")
    assert out.strip() == arguments


def test_the_package_depends_on_what_pyproject_declares() -> None:
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    names = {re.split(r"[\[<>=]", d)[0].replace(".", "-").replace("_", "-").lower()
             for d in declared}
    listed = set(re.findall(r"^\s+python3Packages\.([a-z0-9-]+)$",
                            (NIX / "package.nix").read_text(), re.MULTILINE))
    assert listed == names


def test_the_paths_the_package_rewrites_are_in_the_units() -> None:
    """substituteInPlace --replace-fail breaks the build if a unit stops naming them."""
    text = (NIX / "package.nix").read_text()
    for unit, old in re.findall(r"substituteInPlace \$out/lib/systemd/system/(\S+) \\\n"
                                r"\s+--replace-fail (\S+)", text):
        assert old in (REPO / "systemd" / unit).read_text(), (unit, old)
    assert len(re.findall("--replace-fail", text)) == 2
