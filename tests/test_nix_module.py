"""nix/module.nix evaluated with the real nixpkgs ``lib`` (``lib.evalModules``), and the
files it would build checked by the tools that read them (issue 14).

``tests/nix/eval.nix`` declares the NixOS options the module sets and stubs ``pkgs``
so that each derivation is its build script. Here a configuration is evaluated, its
assertions read, and its build scripts run in bash against a stand-in of the package
(the shipped policies and prompt templates, this checkout's ``zeta-agent``); then
``zeta-agent validate`` and ``nats-server -t`` are run on what they produced, as on a
NixOS host at build and start time.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from lab.natsserver import binary as nats_server
from tests.prereq import missing

REPO = Path(__file__).resolve().parent.parent
VENDORED = Path(os.environ.get("ZETA_NIXPKGS_LIB",
                               REPO.parent / "shared" / "vendor" / "nixpkgs-lib"))
BIN = REPO / ".venv" / "bin"
OPTION = "services.zeta-agents"


def _lib() -> Path:
    if shutil.which("nix-instantiate") is None:
        missing("nix-instantiate is not installed (Debian package nix-bin)")
    if not (VENDORED / "lib" / "default.nix").is_file():
        missing(f"the vendored nixpkgs lib is not at {VENDORED} (../shared/vendor/README.md; "
                "or set $ZETA_NIXPKGS_LIB)")
    return VENDORED / "lib"


@dataclass
class Evaluated:
    failed: list[str]
    raw: dict[str, Any]


def evaluate(tmp_path: Path, module: str) -> Evaluated:
    """Evaluate ``module`` (the body of a NixOS module's attribute set) with nix/module.nix."""
    configuration = tmp_path / "configuration.nix"
    configuration.write_text("{ ... }: {\n  services.zeta-agents = {\n    enable = true;\n"
                             '    package = { type = "derivation"; name = "zeta-agent"; '
                             'outPath = "@package@"; };\n' + module + "\n  };\n}\n")
    expression = (f"import {REPO}/tests/nix/eval.nix {{ lib = import {_lib()}; "
                  f"configuration = {configuration}; }}")
    done = subprocess.run(["nix-instantiate", "--eval", "--strict", "--json", "-E", expression],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    raw = json.loads(done.stdout)
    return Evaluated(raw["failed"], raw)


@dataclass
class Built:
    store: Path
    etc: Path


def build(tmp_path: Path, evaluated: Evaluated) -> Built:
    """Run the module's build scripts as Nix would, then lay out /etc/zeta from them."""
    package = tmp_path / "package"
    for part in ("personas", "policies"):  # what nix/package.nix installs
        shutil.copytree(REPO / part, package / "share" / "zeta-agent" / part)
    store = tmp_path / "store"
    store.mkdir()
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}

    def real(text: str) -> str:
        return text.replace("@package@", str(package)).replace("@store@", str(store))

    for derivation in evaluated.raw["builds"]:
        out = store / derivation["name"]
        done = subprocess.run(["bash", "-euo", "pipefail", "-c", real(derivation["script"])],
                              env={**env, "out": str(out)}, capture_output=True, text=True,
                              timeout=120, check=False)
        assert done.returncode == 0, f"{derivation['name']}: {done.stderr}"
    etc = tmp_path / "etc"
    for name, source in evaluated.raw["etc"].items():
        target = etc / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.startswith("<("):  # a generated file: the stub's process substitution
            shown = subprocess.run(["bash", "-c", f"cat {source}"], capture_output=True,
                                   check=True, timeout=30)
            target.write_bytes(shown.stdout)
        else:
            target.symlink_to(real(source))
    return Built(store, etc)


def persona_file(tmp_path: Path, name: str, replace: tuple[str, str] | None = None) -> Path:
    text = (REPO / "personas" / f"{name}.yaml").read_text()
    if replace is not None:
        text = text.replace(*replace)
    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    return path


def test_a_realistic_host_evaluates_builds_validates_and_serves(tmp_path: Path) -> None:
    files = "\n".join(f'    personas.{n}.file = "{persona_file(tmp_path, n)}";'
                      for n in ("otto", "riven", "vera", "lior"))
    prompt = tmp_path / "nova.prompt.j2"
    prompt.write_text('{% extends "base.prompt.j2" %}\n{% block voice %}Nova.{% endblock %}\n')
    evaluated = evaluate(tmp_path, files + f'''
    personas.nova.settings = {{
      displayName = "Nova"; role = "reviewer"; tier = "observe";
      identity = {{ nkey = "UDRCYTEQGYGIHJ5CBPEZQTTFNYPYJESIOFSKUGX4SQ2DIRHEI75NFVA2";
                   kubernetes.user = "zeta-nova"; }};
      scopes = [ "bus:vote" ]; duties = [ "vote" ]; policies = [ "node-not-ready" ];
      brain = {{ kind = "anthropic"; }};
    }};
    prompts."nova.prompt.j2" = "{prompt}";
    policies.node-not-ready-slow = {{
      detect = {{ kind = "node-condition"; condition = "Ready"; status = [ "False" "Unknown" ];
                 for = "10m"; }};
      remedies = [ {{ action = "k8s.node.cordon"; }} ];
    }};
    fleet.bus.urls = [ "nats://10.0.0.1:4222" "nats://10.0.0.2:4222" ];
    bus.enable = true;
    bus.settings = {{
      listen = "0.0.0.0:4222";
      store_dir = "/var/lib/nats/zeta";
      server_name = "bus-1";
      cluster = {{ name = "zeta"; listen = "0.0.0.0:6222";
                  routes = [ "nats://10.0.0.2:6222" "nats://10.0.0.3:6222" ]; }};
    }};''')
    assert evaluated.failed == []
    built = build(tmp_path, evaluated)
    zeta = built.etc / "zeta"
    # What the agents read at start: the same check a NixOS build ran.
    checked = subprocess.run([str(BIN / "zeta-agent"), "validate", str(zeta)],
                             capture_output=True, text=True, timeout=60, check=False)
    assert checked.returncode == 0, checked.stderr
    assert checked.stdout.startswith("ok: 5 personas, 9 policies")
    assert (zeta / "personas" / "nova.prompt.j2").is_file(), "a model brain's template"
    assert (zeta / "personas" / "base.prompt.j2").is_file(), "and the shipped ones it extends"
    # What zeta-bus.service starts: the rendered users plus the extra settings.
    served = subprocess.run([str(nats_server()), "-t", "-c", str(zeta / "nats.conf")],
                            capture_output=True, text=True, timeout=30, check=False)
    assert served.returncode == 0, served.stdout + served.stderr
    conf = (zeta / "nats.conf").read_text()
    assert conf.count("nkey:") == 5
    assert 'store_dir: "/var/lib/nats/zeta"' in conf
    assert json.loads((zeta / "nats-extra.json").read_text())["cluster"]["name"] == "zeta"
    services = evaluated.raw["services"]
    assert services["zeta-bus"]["StateDirectory"] == ["zeta-bus", "nats/zeta"], (
        "a custom store is a StateDirectory too: the DynamicUser may write only those")
    assert sorted(evaluated.raw["users"]) == [f"zeta-{n}" for n in
                                               ("lior", "nova", "otto", "riven", "vera")]
    assert (built.etc / "polkit-1" / "rules.d" / "60-zeta-agents.rules").read_text()


@pytest.mark.parametrize(("module", "message"), [
    ("bus.enable = true;",
     f"{OPTION}.bus.enable: the bus needs at least one persona in {OPTION}.personas"),
    ('personas.otto.file = "@otto@"; bus.enable = true;\n'
     '    bus.settings.authorization = { users = [ ]; };',
     f"{OPTION}.bus.settings.authorization: rendered from the personas"),
    ('personas.otto.file = "@otto@"; bus.enable = true;\n'
     '    bus.settings.jetstream = { store_dir = "/tmp/js"; };',
     f"{OPTION}.bus.settings.jetstream: rendered from the personas"),
    ('personas.otto.file = "@otto@"; bus.enable = true;\n'
     '    bus.settings.store_dir = "/srv/nats";',
     f"{OPTION}.bus.settings.store_dir: /srv/nats is not a directory under /var/lib"),
    ('personas.otto.file = "@otto@"; bus.enable = true;\n'
     '    bus.settings.store_dir = "/var/lib/../etc";',
     f"{OPTION}.bus.settings.store_dir: /var/lib/../etc is not a directory under /var/lib"),
    ('personas."../x".file = "@otto@";', f'{OPTION}.personas."../x": a persona name is'),
    ('personas."a;touch /tmp/pwned".file = "@otto@";',
     f'{OPTION}.personas."a;touch /tmp/pwned": a persona name is'),
    ('personas.otto.file = "@otto@"; policies."x y" = { };',
     f'{OPTION}.policies."x y": a policy name is'),
    ('personas.otto.file = "@otto@"; prompts."../../etc/x.j2" = "@otto@";',
     f'{OPTION}.prompts."../../etc/x.j2": a template file name'),
    ('personas.otto = { file = "@otto@"; settings = { }; };',
     f"{OPTION}.personas.otto: set exactly one of file and settings"),
], ids=["bus-without-personas", "authorization", "jetstream", "store-outside-var-lib",
        "store-escaping-var-lib", "name-with-dots", "name-with-shell", "policy-name",
        "template-name", "file-and-settings"])
def test_a_broken_configuration_is_an_assertion_naming_the_option(
        tmp_path: Path, module: str, message: str) -> None:
    otto = persona_file(tmp_path, "otto")
    evaluated = evaluate(tmp_path, "    " + module.replace("@otto@", str(otto)))
    assert any(failed.startswith(message) for failed in evaluated.failed), evaluated.failed
    assert "builds" not in evaluated.raw, "nothing is built from a failed assertion"


def test_an_invalid_persona_fails_the_build_naming_its_option(tmp_path: Path) -> None:
    otto = persona_file(tmp_path, "otto", ("displayName: Otto", "displayNme: Otto"))
    evaluated = evaluate(tmp_path, f'    personas.otto.file = "{otto}";\n'
                                   '    personas.vera.settings = { displayName = "Vera"; };')
    assert evaluated.failed == []
    with pytest.raises(AssertionError) as failure:
        build(tmp_path, evaluated)
    log = str(failure.value)
    assert "spec.displayNme: unknown field" in log
    assert "personas/otto.yaml: services.zeta-agents.personas.otto.file" in log
    assert "personas/vera.yaml: services.zeta-agents.personas.vera.settings" in log
