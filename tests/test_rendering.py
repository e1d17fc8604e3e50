"""``zeta-agent render polkit`` and ``render unit``: exact files for the shipped personas,
the scope edges (wildcard units, names that are no unit), and the rules' behaviour in a
JavaScript engine.

polkitd (122, Debian 12) runs rules in an ES5 engine; Node.js runs the same file here
against a stub ``polkit`` object, so the tests check what the rules *decide* for a
request, not only what they look like. The real polkitd is exercised by the nspawn
end-to-end test.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from runtime.config.loading import ConfigSet, config_paths, load
from runtime.host.acting import AGENT_UNIT, unit_name_error
from runtime.model.formats import Persona
from runtime.model.scopes import allows
from runtime.ops.cli import main
from runtime.ops.render.units import host_grants, polkit_file, render_polkit, render_unit
from tests.builders import persona, policy
from tests.prereq import missing

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def shipped() -> ConfigSet:
    return load(config_paths(REPO))


def _polkit(config: ConfigSet, *names: str) -> str:
    chosen = [config.persona(n) for n in names]
    return render_polkit([(p, config.policies_of(p)) for p in chosen], source="/etc/zeta",
                         filename=polkit_file(names[0] if len(names) == 1 else None))


OTTO_RULES = """\
// Rendered by `zeta-agent render polkit` from /etc/zeta; do not edit: re-render after
// changing a persona or its policies. Install as /etc/polkit-1/rules.d/60-zeta-otto.rules.
// Each persona's user may start or restart exactly the units its scopes name, through
// systemd (org.freedesktop.systemd1.manage-units), and reboot the host only with
// host:node:reboot. Every other systemd or logind request from these users is refused
// here, not left to rules that come later.

// Persona otto (coordinator, tier propose), user zeta-otto.
polkit.addRule(function(action, subject) {
    if (subject.user !== "zeta-otto") {
        return polkit.Result.NOT_HANDLED;
    }
    if (action.id === "org.freedesktop.systemd1.manage-units") {
        var unit = action.lookup("unit");
        var verb = action.lookup("verb");
        // host:units:start:kubelet.service
        if (verb === "start" && unit === "kubelet.service") {
            return polkit.Result.YES;
        }
        // host:units:restart:kubelet.service
        if (verb === "restart" && unit === "kubelet.service") {
            return polkit.Result.YES;
        }
        // host:units:start:containerd.service
        if (verb === "start" && unit === "containerd.service") {
            return polkit.Result.YES;
        }
        // host:units:restart:containerd.service
        if (verb === "restart" && unit === "containerd.service") {
            return polkit.Result.YES;
        }
        // host:units:restart:k3s.service
        if (verb === "restart" && unit === "k3s.service") {
            return polkit.Result.YES;
        }
        // agent:peers:restart:*: the agent unit of any persona, and no other unit.
        if (verb === "restart" && /^zeta-agent@[a-z][a-z0-9-]{0,25}\\.service$/.test(unit)) {
            return polkit.Result.YES;
        }
    }
    if (action.id.indexOf("org.freedesktop.systemd1.") === 0 ||
            action.id.indexOf("org.freedesktop.login1.") === 0) {
        return polkit.Result.NO;
    }
    return polkit.Result.NOT_HANDLED;
});
"""

RIVEN_RULE = """\
// Persona riven (adversarial-reviewer, tier observe), user zeta-riven.
// No host scope: this rule grants nothing; zeta-riven is refused every unit and the reboot.
polkit.addRule(function(action, subject) {
    if (subject.user !== "zeta-riven") {
        return polkit.Result.NOT_HANDLED;
    }
    if (action.id.indexOf("org.freedesktop.systemd1.") === 0 ||
            action.id.indexOf("org.freedesktop.login1.") === 0) {
        return polkit.Result.NO;
    }
    return polkit.Result.NOT_HANDLED;
});
"""


def test_polkit_rules_of_otto_are_exactly_its_units_and_verbs(shipped: ConfigSet) -> None:
    assert _polkit(shipped, "otto") == OTTO_RULES


def test_a_persona_without_host_scopes_gets_a_rule_that_grants_nothing(
        shipped: ConfigSet) -> None:
    text = _polkit(shipped, "riven")
    assert text.endswith("\n\n" + RIVEN_RULE)
    assert "Result.YES" not in text


def test_render_polkit_all_has_one_rule_per_persona(
        capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["render", "polkit", "--all", "--config-dir", str(REPO)]) == 0
    out = capsys.readouterr().out
    users = [line.split('"')[1] for line in out.splitlines()
             if line.strip().startswith("if (subject.user !==")]
    assert users == [f"zeta-{n}" for n in ("alexa", "lior", "otto", "riven", "vera")]
    assert "60-zeta-agents.rules" in out
    assert out.count("Result.YES") == OTTO_RULES.count("Result.YES")  # only otto's


def test_render_polkit_needs_a_known_persona(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["render", "polkit", "nobody", "--config-dir", str(REPO)]) == 2
    assert "no persona 'nobody'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["render", "polkit", "--config-dir", str(REPO)])  # neither a name nor --all


# ---------------------------------------------------------------- scope edges


KUBELET = policy("kubelet-failed", {"kind": "unit-failed", "units": ["kubelet.service"],
                                    "for": "1m"},
                 [{"action": "host.unit.restart", "params": {"unit": "kubelet.service"}}])


def test_a_wildcard_unit_is_narrowed_to_the_units_the_policies_name() -> None:
    """host:units:*:* (tier repair-node) is not rendered as "every unit": start:* would
    reach reboot.target and debug-shell.service. polkit gets the policies' units."""
    grants = host_grants(persona("nova", tier="repair-node"), [KUBELET])
    assert [(g.verb, g.unit, g.scope) for g in grants.units] == [
        ("start", "kubelet.service", "host:units:start:kubelet.service"),
        ("restart", "kubelet.service", "host:units:restart:kubelet.service")]
    assert grants.any_peer == "agent:peers:restart:*"
    assert "narrowed to the units this persona's policies name (kubelet.service)" in \
        grants.notes[0]
    assert host_grants(persona("nova", tier="repair-node"), []).units == ()


def test_explicit_peers_and_reboot_and_names_that_are_no_unit() -> None:
    who = persona("nova", scopes=["agent:peers:restart:vera", "host:node:reboot",
                                  "host:units:restart:kubelet"])
    grants = host_grants(who, [])
    assert [(g.verb, g.unit) for g in grants.units] == [("restart", "zeta-agent@vera.service")]
    assert grants.any_peer is None
    assert grants.reboot
    assert grants.notes == ("Grants nothing: 'kubelet' is not a unit name: [A-Za-z0-9:_.\\-] "
                            "characters, an optional @instance, and a suffix (service, socket, "
                            "target, device, mount, automount, swap, timer, path, slice, "
                            "scope).",)


HOST_SCOPES = st.lists(st.sampled_from([
    "host:units:start:kubelet.service", "host:units:restart:kubelet.service",
    "host:units:*:k3s.service", "host:*:restart:containerd.service", "host:units:restart:*",
    "agent:peers:restart:vera", "agent:peers:restart:*", "host:node:reboot", "host:*:*:*",
]), max_size=5)
UNITS = ("kubelet.service", "k3s.service", "containerd.service", "sshd.service")


@given(HOST_SCOPES)
def test_polkit_grants_agree_with_the_runtime_check(scopes: list[str]) -> None:
    """Every grant is allowed by the runtime check; every unit the runtime allows and a
    non-wildcard scope or a policy names is granted; nothing else is."""
    who = persona("nova", scopes=scopes)
    effective = who.spec.effective_scopes
    grants = host_grants(who, [KUBELET])
    granted = {(g.verb, g.unit) for g in grants.units}
    for unit in UNITS:
        for verb in ("start", "restart"):
            explicit = any(s.endswith(f":{unit}") for s in scopes)
            expected = allows(effective, f"host:units:{verb}:{unit}") and (
                explicit or unit == "kubelet.service")
            assert ((verb, unit) in granted) == expected, (verb, unit)
    assert grants.reboot == allows(effective, "host:node:reboot")
    vera = ("restart", AGENT_UNIT.format(persona="vera")) in granted or bool(grants.any_peer)
    assert vera == allows(effective, "agent:peers:restart:vera")


# ---------------------------------------------------------------- what polkit decides


def _decide(rules: str, requests: list[dict[str, str]]) -> list[str]:
    """Run ``rules`` in Node.js with a stub polkit, as polkitd would, for each request."""
    node = shutil.which("node")
    if node is None:
        missing("node (Node.js) is not installed")
    script = """
const rules = [];
const polkit = {Result: {YES: "yes", NO: "no", NOT_HANDLED: "not-handled"},
                addRule: (f) => rules.push(f)};
eval(RULES);
console.log(JSON.stringify(REQUESTS.map((r) => {
  const action = {id: r.id, lookup: (k) => r[k]};
  for (const rule of rules) {
    const result = rule(action, {user: r.user});
    if (result !== polkit.Result.NOT_HANDLED) return result;
  }
  return "not-handled";
})));
""".replace("RULES", json.dumps(rules)).replace("REQUESTS", json.dumps(requests))
    result = subprocess.run([node, "-e", script], capture_output=True, text=True, timeout=60,
                            check=True)
    decided: list[str] = json.loads(result.stdout)
    return decided


MANAGE = "org.freedesktop.systemd1.manage-units"


def _unit(user: str, verb: str, unit: str) -> dict[str, str]:
    return {"id": MANAGE, "user": user, "verb": verb, "unit": unit}


def test_polkit_decides_exactly_what_the_scopes_say(shipped: ConfigSet) -> None:
    rules = _polkit(shipped, "alexa", "lior", "otto", "riven", "vera")
    requests = [
        _unit("zeta-otto", "restart", "k3s.service"),
        _unit("zeta-otto", "start", "k3s.service"),  # only restart is granted
        _unit("zeta-otto", "stop", "kubelet.service"),
        _unit("zeta-otto", "restart", "zeta-agent@vera.service"),
        _unit("zeta-otto", "restart", "zeta-agent@vera.service.d"),
        _unit("zeta-otto", "restart", "sshd.service"),
        _unit("zeta-riven", "restart", "k3s.service"),
        {"id": "org.freedesktop.login1.reboot", "user": "zeta-otto"},
        {"id": "org.freedesktop.systemd1.manage-unit-files", "user": "zeta-otto"},
        _unit("alice", "restart", "k3s.service"),  # not ours: left to other rules
        {"id": "org.freedesktop.NetworkManager.network-control", "user": "zeta-otto"},
    ]
    assert _decide(rules, requests) == [
        "yes", "no", "no", "yes", "no", "no", "no", "no", "no", "not-handled", "not-handled"]


def test_reboot_is_granted_only_with_its_scope_and_never_past_inhibitors() -> None:
    who = persona("nova", scopes=["host:node:reboot"])
    rules = render_polkit([(who, [])], source="test", filename=polkit_file("nova"))
    assert _decide(rules, [
        {"id": f"org.freedesktop.login1.{action}", "user": "zeta-nova"}
        for action in ("reboot", "reboot-multiple-sessions", "reboot-ignore-inhibit",
                       "power-off")]) == ["yes", "yes", "no", "no"]


# ---------------------------------------------------------------- the unit drop-in


OTTO_DROPIN = """\
# Rendered by `zeta-agent render unit otto` from /etc/zeta; do not edit:
# re-render after changing the persona or its credentials, then `systemctl daemon-reload`.
# Install as /etc/systemd/system/zeta-agent@otto.service.d/50-zeta.conf.

[Unit]
Description=Zeta agent Otto (coordinator)

[Service]
# Every credential this persona has, read by PID 1 from /etc/zeta/credentials/otto/.
# The empty assignment resets the template's list, so this file is the whole list.
# Optional files are named only if they exist: a LoadCredential= whose file is missing
# fails the start. The seed is always named: without it the agent cannot vote.
LoadCredential=
LoadCredential=nkey.seed:/etc/zeta/credentials/otto/nkey.seed
LoadCredential=kubeconfig:/etc/zeta/credentials/otto/kubeconfig
# No anthropic-api-key: /etc/zeta/credentials/otto/anthropic-api-key does not exist.
# Memory: this persona watches Kubernetes (it has a kubeconfig), whose objects it keeps \
in memory.
MemoryHigh=384M
MemoryMax=512M
"""


def _credentials(root: Path, persona_name: str, *files: str) -> Path:
    directory = root / persona_name
    directory.mkdir(parents=True)
    for name in files:
        (directory / name).write_text("secret\n")
    return root


def _as_installed(text: str, root: Path) -> str:
    return text.replace(str(root), "/etc/zeta/credentials")


def test_unit_drop_in_of_otto_names_the_credentials_it_has(
        shipped: ConfigSet, tmp_path: Path) -> None:
    root = _credentials(tmp_path, "otto", "nkey.seed", "kubeconfig")
    text = render_unit(shipped.persona("otto"), credentials_dir=root, source="/etc/zeta")
    # The temporary directory stands where /etc/zeta/credentials would be: InaccessiblePaths=
    # for a non-default directory is the only line that differs, checked below.
    assert _as_installed(text, root).replace(
        "# The fleet keeps credentials here rather than in /etc/zeta/credentials: hidden\n"
        "# from the agent all the same.\nInaccessiblePaths=-/etc/zeta/credentials\n",
        "") == OTTO_DROPIN


def test_unit_drop_in_without_optional_credentials_or_seed(tmp_path: Path) -> None:
    who: Persona = persona("nova")
    text = render_unit(who, credentials_dir=tmp_path, source="here")
    assert [line for line in text.splitlines() if line.startswith("LoadCredential=")] == [
        "LoadCredential=", f"LoadCredential=nkey.seed:{tmp_path}/nova/nkey.seed"]
    assert f"# {tmp_path}/nova/nkey.seed does not exist yet: `zeta-agent keygen nova " \
           "--write` first." in text
    assert "MemoryMax=256M" in text
    assert f"InaccessiblePaths=-{tmp_path}\n" in text


def test_render_unit_from_the_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = _credentials(tmp_path, "vera", "nkey.seed", "anthropic-api-key")
    assert main(["render", "unit", "vera", "--config-dir", str(REPO),
                 "--credentials-dir", str(root)]) == 0
    out = capsys.readouterr().out
    assert f"LoadCredential=anthropic-api-key:{root}/vera/anthropic-api-key\n" in out
    assert "Description=Zeta agent Vera (continuity)\n" in out
    assert main(["render", "unit", "nobody", "--config-dir", str(REPO)]) == 2


def test_unit_names_follow_systemds_grammar() -> None:
    for good in ("k3s.service", "zeta-agent@otto.service", "dev-sda1.device",
                 "a\\x2db.mount", "getty@tty1.service", "x:y.socket"):
        assert unit_name_error(good) is None, good
    for bad in ("k3s", "foo@.service", "x y.service", "k3s.servic", "../x.service",
                "a/b.service", "x.service;reboot", "", "a" * 250 + ".service"):
        assert unit_name_error(bad) is not None, bad


