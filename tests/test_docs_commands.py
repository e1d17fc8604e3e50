"""The docs cannot rot: every shell command they show is run here, or listed with why not.

Commands are the lines of ```sh blocks and the ``$`` lines of ```console blocks in
README.md and docs/*.md (``a && b`` is two commands). Each one is either

- a synopsis (it has ``[optional]`` parts): every ``--flag`` it shows must be in the
  command's ``--help``;
- in ``RUN``: run with bash through the installed ``.venv/bin/zeta-agent``, in a sandbox
  that stands in for a fresh host (``/etc``, ``/usr/lib``, ``/usr/share``, ``/opt``,
  ``/var`` and ``~`` live under a temporary root; ``/etc/zeta`` holds a copy of the
  shipped configuration, with its placeholder keys and no seeds, as after
  ``cp personas/*.yaml /etc/zeta/…``),
  from a view of this checkout; a ```console block's output must be what it prints;
- in ``SKIP`` or ``SKIP_PREFIXES``, with the reason it cannot run on a dev machine.

A command in none of them fails the suite, and so does an entry no doc shows any more.
The examples in docs/policies.md and docs/personas.md are loaded, and every relative
link in README.md and docs/*.md must point at a file, and an anchor, that exist.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pytest
from ruamel.yaml import YAML

from lab.natsserver import NatsServer
from runtime.config.loading import load
from runtime.model import catalog
from runtime.model import formats as config
from runtime.model.formats import Remedy

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
BIN = REPO / ".venv" / "bin"
TIMEOUT = 60.0

# ---------------------------------------------------------------- reading the docs

FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<lang>[\w-]*)[ \t]*\n(?P<body>.*?)^(?P=indent)```",
                   re.MULTILINE | re.DOTALL)


@dataclass(frozen=True)
class Shown:
    """One command as a doc shows it, with the output a console block says it prints."""

    command: str
    doc: str
    output: tuple[str, ...] | None = None


def fenced(path: Path, *langs: str) -> Iterator[str]:
    """The bodies of the fenced blocks in ``langs``, their indentation removed."""
    for m in FENCE.finditer(path.read_text(encoding="utf-8")):
        if m["lang"] in langs:
            indent = len(m["indent"])
            yield "".join(line[indent:] for line in m["body"].splitlines(keepends=True))


def _logical(lines: list[str]) -> Iterator[str]:
    """Join ``\\`` continuations and ``for …; do`` … ``done`` loops; drop comments."""
    pending: list[str] = []
    for raw in lines:
        line = re.sub(r"\s+#.*$", "", raw.rstrip()) if not raw.lstrip().startswith("#") else ""
        if not line.strip():
            continue
        pending.append(line.strip().removesuffix("\\").strip())
        loop = pending[0].startswith("for ") and not re.search(r"\bdone$", pending[-1])
        if raw.rstrip().endswith("\\") or loop:
            continue
        text = " ".join(pending) if not pending[0].startswith("for ") else "; ".join(pending)
        pending = []
        yield re.sub(r"do; ", "do ", text)


def shown(path: Path) -> Iterator[Shown]:
    """Every command ``path`` shows in its ```sh and ```console blocks."""
    doc = str(path.relative_to(REPO))
    for body in fenced(path, "sh"):
        for line in _logical(body.splitlines()):
            for part in line.split(" && "):
                yield Shown(part.strip(), doc)
    for body in fenced(path, "console"):
        lines = body.splitlines()
        starts = [i for i, line in enumerate(lines) if line.startswith("$ ")]
        for n, i in enumerate(starts):
            end = starts[n + 1] if n + 1 < len(starts) else len(lines)
            yield Shown(lines[i][2:].strip(), doc, tuple(lines[i + 1:end]))


SHOWN: dict[str, Shown] = {s.command: s for path in DOCS for s in shown(path)}


def is_synopsis(command: str) -> bool:
    return " [" in command


# ---------------------------------------------------------------- the sandbox


@dataclass
class Sandbox:
    root: Path
    checkout: Path
    env: dict[str, str]

    @property
    def config(self) -> Path:
        return self.root / "etc" / "zeta"

    def zeta(self, *args: str) -> str:
        done = subprocess.run([str(BIN / "zeta-agent"), *args], env=self.env, cwd=self.config,
                              capture_output=True, text=True, timeout=TIMEOUT, check=True)
        return done.stdout

    def fleet(self, **spec: Any) -> None:
        spec = {"credentialsDir": str(self.config / "credentials"), **spec}
        yaml = YAML()
        with (self.config / "fleet.yaml").open("w", encoding="utf-8") as out:
            yaml.dump({"apiVersion": "zeta/v1", "kind": "Fleet", "spec": spec}, out)


def sandbox(tmp: Path) -> Sandbox:
    """A fake host root with the shipped configuration in /etc/zeta, and a checkout view."""
    root = tmp / "root"
    for part in ("personas", "policies"):
        shutil.copytree(REPO / part, root / "etc" / "zeta" / part)
    for directory in ("etc/sysusers.d", "etc/polkit-1/rules.d", "etc/systemd/system",
                      "usr/lib/tmpfiles.d", "home", "var/lib"):
        (root / directory).mkdir(parents=True, exist_ok=True)
    # The checkout the docs' relative paths mean, without letting a command write into it.
    checkout = tmp / "checkout"
    checkout.mkdir()
    for part in (".venv", "personas", "policies", "systemd", "docs", "bench"):
        (checkout / part).symlink_to(REPO / part)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ZETA_", "NATS_"))}
    env |= {"PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}", "HOME": str(root / "home"),
            "ZETA_CONFIG_DIR": str(root / "etc" / "zeta")}
    box = Sandbox(root, checkout, env)
    box.fleet()
    return box


def in_root(command: str, root: Path) -> str:
    """``command`` with the host's absolute paths moved under the sandbox root."""
    return re.sub(r"(?<![\w./~-])/(etc|usr/lib|usr/share|opt|var)/", lambda m: f"{root}/{m[1]}/",
                  command)


# ---------------------------------------------------------------- set-ups


def with_operator(box: Sandbox) -> None:
    """Alice's key from keygen, listed in fleet.yaml as an operator (docs/operations.md)."""
    key = box.zeta("keygen", "alice").strip()
    box.fleet(operators=[{"name": "alice", "nkey": key}])


def with_nova(box: Sandbox) -> None:
    """Steps 1 and 2 of docs/operations.md's "Add a persona": nova.yaml, then its key."""
    text = (box.config / "personas" / "alexa.yaml").read_text(encoding="utf-8")
    (box.config / "personas" / "nova.yaml").write_text(
        text.replace("name: alexa", "name: nova").replace("zeta-alexa", "zeta-nova"),
        encoding="utf-8")
    box.zeta("keygen", "nova", "--write")


def with_nova_drop_in_dir(box: Sandbox) -> None:
    """with_nova, and the directory the line before it in that block makes."""
    with_nova(box)
    (box.root / "etc" / "systemd" / "system" / "zeta-agent@nova.service.d").mkdir()


def broken_otto(box: Sandbox) -> None:
    """The two typos docs/configuration.md's error example shows, in otto.yaml."""
    otto = box.config / "personas" / "otto.yaml"
    lines = otto.read_text(encoding="utf-8").splitlines(keepends=True)
    assert lines[7].strip().startswith("displayName:")
    assert "k8s:nodes:cordon" in lines[17]
    lines[7] = lines[7].replace("displayName", "displayNme")
    lines[17] = lines[17].replace("cordon", "cordn")
    otto.write_text("".join(lines), encoding="utf-8")


@dataclass(frozen=True)
class Run:
    """How one shown command runs; ``shell`` and ``why`` when it must differ from the doc."""

    cwd: Literal["checkout", "config"] = "checkout"
    setup: Callable[[Sandbox], None] | None = None
    bus: bool = False
    code: int = 0
    expect: str = ""
    shell: str | None = None
    why: str = ""


INSTALL_UNITS = ("cp systemd/zeta-agent@.service systemd/zeta-agents.target "
                 "systemd/zeta-bus.service /etc/systemd/system/")
UNIT_LOOP = ("for p in otto alexa riven vera lior; do mkdir -p "
             "/etc/systemd/system/zeta-agent@$p.service.d; zeta-agent render unit $p -o "
             "/etc/systemd/system/zeta-agent@$p.service.d/50-zeta.conf; done")
CONTROL = Run(bus=True, setup=with_operator, expect=r"^sent [\w-]+ as operator alice ")

RUN: dict[str, Run] = {
    ".venv/bin/zeta-agent validate personas policies": Run(
        expect=r"^ok: 5 personas, 8 policies, fleet: built-in defaults$"),
    "zeta-agent validate personas policies": Run(),
    "zeta-agent validate .": Run(cwd="config", setup=broken_otto, code=1),
    "zeta-agent personas --config-dir .": Run(),
    "zeta-agent completion bash > /etc/bash_completion.d/zeta-agent": Run(
        shell="zeta-agent completion bash | bash -n",
        why="the sandbox has no bash-completion; bash -n checks that the script parses"),
    "zeta-agent validate --json": Run(expect=r'"ok": true'),
    "zeta-agent keygen otto --write": Run(expect=r"^U[A-Z2-7]{55}$"),
    "zeta-agent keygen alice --credentials-dir ~/.config/zeta/credentials": Run(
        expect=r"^U[A-Z2-7]{55}$"),
    "zeta-agent freeze --operator alice --reason \"etcd is degraded, hands off\"": CONTROL,
    "zeta-agent thaw --operator alice --reason \"etcd healthy again\"": CONTROL,
    ("zeta-agent breaker-reset --operator alice --reason \"storm over\" "
     "--policy node-not-ready"): CONTROL,
    ("zeta-agent pause --operator alice --policy node-not-ready --for 2h "
     "--reason \"kernel upgrades\""): CONTROL,
    "zeta-agent pause --operator alice --all --for 30m --reason \"etcd maintenance\"": CONTROL,
    "zeta-agent resume --operator alice --all --reason \"done early\"": CONTROL,
    "zeta-agent render rbac otto --config-dir /etc/zeta | kubectl apply -f -": Run(
        shell="zeta-agent render rbac otto --config-dir /etc/zeta > otto-rbac.yaml",
        expect="", why="no cluster to apply it to; tests/test_rbac.py applies the "
        "rendered RBAC to a real API server"),
    "zeta-agent render rbac --all --config-dir /etc/zeta -o zeta-rbac.yaml": Run(),
    "nats-server -c /etc/zeta/nats.conf": Run(
        shell="zeta-agent render nats -o /etc/zeta/nats.conf && "
              "nats-server -t -c /etc/zeta/nats.conf",
        why="the configuration rendered just before it; -t checks it and exits instead "
            "of serving"),
    INSTALL_UNITS: Run(),
    "cp systemd/tmpfiles.d/zeta-agent.conf /usr/lib/tmpfiles.d/": Run(),
    "mkdir -p /usr/share/doc/zeta-agent": Run(),
    "cp docs/*.md /usr/share/doc/zeta-agent/": Run(
        shell="mkdir -p /usr/share/doc/zeta-agent && cp docs/*.md /usr/share/doc/zeta-agent/",
        why="each command runs in a fresh sandbox: the mkdir just before it, again"),
    "cp personas/*.yaml /etc/zeta/personas/": Run(),
    "cp policies/*.yaml /etc/zeta/policies/": Run(),
    "for p in otto alexa riven vera lior; do zeta-agent keygen $p --write; done": Run(),
    "zeta-agent render sysusers -o /etc/sysusers.d/zeta-agents.conf": Run(),
    "zeta-agent render polkit --all -o /etc/polkit-1/rules.d/60-zeta-agents.rules": Run(),
    UNIT_LOOP: Run(),
    "zeta-agent render nats --listen 0.0.0.0:4222 -o /etc/zeta/nats.conf": Run(),
    "zeta-agent render nats -o /etc/zeta/nats.conf": Run(),
    "mkdir -p /etc/systemd/system/zeta-agent@nova.service.d": Run(),
    ("zeta-agent render unit nova -o "
     "/etc/systemd/system/zeta-agent@nova.service.d/50-zeta.conf"): Run(
        setup=with_nova_drop_in_dir),
    "zeta-agent render rbac nova | kubectl apply -f -": Run(
        setup=with_nova, shell="zeta-agent render rbac nova > nova-rbac.yaml",
        why="no cluster to apply it to; tests/test_rbac.py applies the rendered RBAC to a "
            "real API server"),
}

SKIP: dict[str, str] = {
    "make lab": "the lab itself (minutes, and a Kubernetes build the first time); "
                "tests/test_lab.py runs `zeta-lab` end to end",
    "make test": "the whole suite, this test included",
    "python -m lab.building": "builds kube-apiserver, kube-controller-manager "
        "and etcd from source (minutes of CPU); the k8s_binaries fixture in tests/k8s.py "
        "runs the same build",
    "python3 -m venv /opt/zeta-agent": "an installation into a new virtualenv; the next "
        "line downloads from PyPI, and `make test` installs this package into .venv",
    "/opt/zeta-agent/bin/pip install 'zeta-agent[bus]'": "downloads from PyPI",
    "zeta-agent bus init --operator oncall": "needs the operator's seed on a real fleet's "
        "bus; tests/test_e2e_systemd.py runs it in a booted Debian root, and "
        "tests/test_operator_cli.py runs `bus init` and `bus check` against a real server",
    "systemd-tmpfiles --create zeta-agent.conf": "creates /etc/zeta on the real host (root)",
    "systemd-sysusers": "creates system users on the real host (root); "
        "tests/test_e2e_systemd.py runs it in a booted Debian root",
    "nats-server --signal reload=<pid of nats-server>": "signals a running server whose "
        "pid the reader fills in",
    "nats --server nats://cp-1:4222 --nkey /etc/zeta/credentials/oncall/nkey.seed sub "
    "'zeta.>'": "a watcher's session on a real fleet's bus (cp-1); "
        "tests/test_natscli.py runs `nats sub 'zeta.>'` against a real server",
    "nats --server nats://cp-1:4222 --nkey ~/.config/zeta/credentials/wanda/nkey.seed sub "
    "'zeta.>'": "a watcher's session on a real fleet's bus (cp-1); "
        "tests/test_natscli.py runs `nats sub 'zeta.>'` against a real server",
}

SKIP_PREFIXES: dict[str, str] = {
    "systemctl ": "manages units of the real host's systemd (root); "
                  "tests/test_e2e_systemd.py does it in a booted Debian root",
    "journalctl ": "reads the real host's journal",
    "kubectl label ": "labels a node of a real cluster; what the opt-out label does is "
                      "tested in tests/test_selectors.py",
    ".venv/bin/python bench/": "a benchmark: minutes of CPU, not a test (docs/benchmarks.md)",
    ".venv/bin/python -m bench": "a benchmark: minutes of CPU, not a test (docs/benchmarks.md)",
}


def skipped(command: str) -> str | None:
    if command in SKIP:
        return SKIP[command]
    return next((why for prefix, why in SKIP_PREFIXES.items() if command.startswith(prefix)),
                None)


# ---------------------------------------------------------------- coverage of the lists


def test_every_command_in_the_docs_is_run_or_listed() -> None:
    unknown = [f"{s.doc}: {s.command}" for s in SHOWN.values()
               if not is_synopsis(s.command) and s.command not in RUN
               and skipped(s.command) is None]
    assert not unknown, "add these to RUN (or SKIP, with a reason):\n" + "\n".join(unknown)


def test_every_listed_command_is_still_in_the_docs() -> None:
    stale = [c for c in [*RUN, *SKIP] if c not in SHOWN]
    stale += [p for p in SKIP_PREFIXES if not any(c.startswith(p) for c in SHOWN)]
    assert not stale, f"no doc shows these any more: {stale}"


def test_the_extraction_sees_the_commands() -> None:
    # Guards the parser: a regression that finds nothing would pass everything above.
    assert {"make lab", "zeta-agent validate .", INSTALL_UNITS, UNIT_LOOP} <= set(SHOWN)
    assert SHOWN["zeta-agent validate personas policies"].output == (
        "ok: 5 personas, 8 policies, fleet: built-in defaults",)


# ---------------------------------------------------------------- running them


def _matches(expected: tuple[str, ...], actual: list[str]) -> bool:
    """Equal line by line, ``…`` in an expected line standing for anything."""
    return len(expected) == len(actual) and all(
        re.fullmatch(".*".join(map(re.escape, want.split("…"))), got)
        for want, got in zip(expected, actual, strict=True))


@pytest.mark.parametrize("command", sorted(c for c in SHOWN if c in RUN))
def test_the_command_runs(command: str, tmp_path: Path) -> None:
    run, doc = RUN[command], SHOWN[command]
    box = sandbox(tmp_path)
    if run.setup is not None:
        run.setup(box)
    server = NatsServer(tmp_path / "nats").start() if run.bus else None
    try:
        if server is not None:
            box.env["ZETA_NATS_URL"] = server.url
        done = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", in_root(run.shell or command, box.root)],
            cwd=box.checkout if run.cwd == "checkout" else box.config, env=box.env,
            capture_output=True, text=True, timeout=TIMEOUT, check=False)
    finally:
        if server is not None:
            server.stop()
    said = f"{doc.doc}: {command}\nstdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    assert done.returncode == run.code, said
    if doc.output is not None:
        assert _matches(doc.output, (done.stdout + done.stderr).splitlines()), said
    if run.expect:
        assert re.search(run.expect, done.stdout, re.MULTILINE), said


SYNOPSES = sorted(c for c in SHOWN if is_synopsis(c))


def _subcommand(synopsis: str) -> list[str]:
    words = synopsis.split()
    assert words[0] == "zeta-agent", synopsis
    return words[1:3] if words[1] == "render" else words[1:2]


@pytest.mark.parametrize("synopsis", SYNOPSES)
def test_a_synopsis_shows_only_real_options(synopsis: str) -> None:
    sub = _subcommand(synopsis)
    done = subprocess.run([str(BIN / "zeta-agent"), *sub, "--help"], capture_output=True,
                          text=True, timeout=TIMEOUT, check=True)
    flags = set(re.findall(r"(?<![\w-])--[a-z][a-z-]*", synopsis))
    missing = {flag for flag in flags if not re.search(rf"{flag}\b", done.stdout)}
    assert not missing, f"`zeta-agent {' '.join(sub)} --help` has no {sorted(missing)}"


def test_there_are_synopses() -> None:
    assert {"validate", "keygen", "watch", "audit", "think"} <= {
        _subcommand(s)[0] for s in SYNOPSES}


# ---------------------------------------------------------------- examples and links


def _yaml_blocks(path: Path) -> list[Any]:
    yaml = YAML(typ="safe")
    return [yaml.load(body) for body in fenced(path, "yaml")]


def _load_with_shipped(tmp: Path, document: dict[str, Any]) -> list[str]:
    """Errors from loading ``document`` with the shipped files (one of its name replaced)."""
    kind = "personas" if document["kind"] == "Persona" else "policies"
    name = document["metadata"]["name"]
    for part in ("personas", "policies"):
        shutil.copytree(REPO / part, tmp / part, dirs_exist_ok=True)
    (tmp / kind / f"{name}.yaml").unlink(missing_ok=True)
    yaml = YAML()
    with (tmp / kind / f"{name}.yaml").open("w", encoding="utf-8") as out:
        yaml.dump(document, out)
    return [str(e) for e in load([tmp / "personas", tmp / "policies"], strict=False).errors]


EXAMPLES = [(path.name, n, block) for path in (REPO / "docs" / "policies.md",
                                               REPO / "docs" / "personas.md")
            for n, block in enumerate(_yaml_blocks(path))]


@pytest.mark.parametrize(("doc", "n", "block"), EXAMPLES,
                         ids=[f"{doc}-{n}" for doc, n, _ in EXAMPLES])
def test_every_example_is_valid(doc: str, n: int, block: Any, tmp_path: Path) -> None:
    if isinstance(block, list):
        for remedy in block:
            Remedy.model_validate(remedy)
    else:
        assert _load_with_shipped(tmp_path, block) == [], f"{doc} block {n}"


def test_policies_md_has_an_example_of_every_detector_and_action() -> None:
    text = (REPO / "docs" / "policies.md").read_text(encoding="utf-8")
    policies = [b for _, _, b in EXAMPLES if isinstance(b, dict) and b["kind"] == "RepairPolicy"]
    remedies = [r for _, _, b in EXAMPLES if isinstance(b, list) for r in b]
    remedies += [r for p in policies for r in p["spec"]["remedies"]]
    kinds = {typing.get_args(d.model_fields["kind"].annotation)[0]
             for d in typing.get_args(typing.get_args(config.Detect)[0])}
    assert kinds == {p["spec"]["detect"]["kind"] for p in policies}
    assert set(catalog.CATALOG) == {r["action"] for r in remedies}
    for kind in kinds:
        assert f"### `{kind}`" in text


def _slug(heading: str) -> str:
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = FENCE.sub("", path.read_text(encoding="utf-8"))
    seen: dict[str, int] = {}
    anchors = set()
    for heading in re.findall(r"^#{1,6} (.+)$", text, re.MULTILINE):
        slug = _slug(heading)
        anchors.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
        seen[slug] = seen.get(slug, 0) + 1
    return anchors


LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def test_every_relative_link_points_at_something_real() -> None:
    broken = []
    for path in DOCS:
        prose = FENCE.sub("", path.read_text(encoding="utf-8"))
        for target in LINK.findall(prose):
            if re.match(r"[a-z]+:", target):
                continue
            file, _, anchor = target.partition("#")
            resolved = (path.parent / file).resolve() if file else path
            if not resolved.exists():
                broken.append(f"{path.name}: {target} (no such file)")
            elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
                broken.append(f"{path.name}: {target} (no such heading)")
    assert not broken, "\n".join(broken)


def test_the_link_check_reads_anchors_the_way_github_does() -> None:
    assert _slug("Checking configuration: `zeta-agent validate`") == (
        "checking-configuration-zeta-agent-validate")
    assert "the-ladder" in _anchors(REPO / "docs" / "policies.md")
