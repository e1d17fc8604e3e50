"""Read persona, policy and fleet files, reporting every error with file, line and field.

The loader never stops at the first problem: an operator fixing a directory wants
the whole list. Each error names the file, the 1-based line, the dotted field path
and what was expected, in the ``file:line: field: message`` shape editors and CI
annotations understand.
"""

from __future__ import annotations

import difflib
import os
import types
import typing
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

from pydantic import BaseModel, ValidationError
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import MarkedYAMLError, YAMLError

from runtime.config.files import UnreadableError, read_text
from runtime.config.templates import check_template
from runtime.model import paths
from runtime.model.formats import (
    DEFAULT_FLEET,
    KINDS,
    AnthropicBrain,
    Fleet,
    Persona,
    RepairPolicy,
    check_bus_url,
)


@dataclass(frozen=True, order=True)
class ConfigError:
    """One problem in one file."""

    file: str
    line: int
    field: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        label = f"{self.field}: " if self.field else ""
        return f"{where}: {label}{self.message}"


class ConfigInvalidError(Exception):
    """Raised by ``load`` when a configuration has errors; carries all of them."""

    def __init__(self, errors: Sequence[ConfigError]) -> None:
        self.errors = tuple(sorted(errors))
        super().__init__("\n".join(str(e) for e in self.errors))


T = TypeVar("T")


@dataclass(frozen=True)
class Located(Generic[T]):
    """A loaded object and where it came from."""

    value: T
    file: str
    node: CommentedMap = field(repr=False, compare=False)

    def line_of(self, *path: str | int) -> int:
        return _line_at(self.node, path)


@dataclass
class ConfigSet:
    """Everything loaded from one or more directories, plus every error found."""

    personas: dict[str, Located[Persona]] = field(default_factory=dict)
    policies: dict[str, Located[RepairPolicy]] = field(default_factory=dict)
    fleet: Fleet = DEFAULT_FLEET
    fleet_file: str | None = None
    # Where the Fleet document came from, so errors found later point at its lines.
    fleet_located: Located[Fleet] | None = field(default=None, repr=False)
    errors: list[ConfigError] = field(default_factory=list)
    # (kind, name) of documents that failed validation, so references to them are
    # not reported a second time as "no such policy".
    invalid: set[tuple[str, str]] = field(default_factory=set)
    # Directories that could not be listed: what they define is unknown, so no
    # reference is reported missing because of them (their own error says why).
    unlisted: list[str] = field(default_factory=list)

    def persona(self, name: str) -> Persona:
        return self.personas[name].value

    def policies_of(self, persona: Persona) -> tuple[RepairPolicy, ...]:
        return tuple(self.policies[p].value for p in persona.spec.policies if p in self.policies)


# ---------------------------------------------------------------- YAML with positions


def _yaml() -> YAML:
    yaml = YAML(typ="rt")
    yaml.allow_duplicate_keys = False
    return yaml


def _line_at(node: Any, path: Iterable[str | int]) -> int:
    """1-based line of the deepest element of ``path`` present in ``node``."""
    # A tagged scalar (`=` is YAML's value tag) has a position object with no line.
    line = (getattr(getattr(node, "lc", None), "line", None) or 0) + 1
    for part in path:
        if isinstance(node, CommentedMap) and part in node:
            line = node.lc.key(part)[0] + 1
            node = node[part]
        elif isinstance(node, CommentedSeq) and isinstance(part, int) and part < len(node):
            line = node.lc.item(part)[0] + 1
            node = node[part]
        # otherwise: a discriminator tag or a missing key; keep the parent's line
    return line


def _present_path(node: Any, loc: Sequence[str | int]) -> list[str | int]:
    """The part of a pydantic error location that exists in the document (drops union tags)."""
    out: list[str | int] = []
    for part in loc:
        if (isinstance(node, CommentedMap) and part in node) or (
                isinstance(node, CommentedSeq) and isinstance(part, int) and part < len(node)):
            node = node[part]
            out.append(part)
        elif isinstance(part, str) and part in _union_tags():
            continue  # pydantic names the union member it tried; the file does not
        elif isinstance(node, CommentedMap | CommentedSeq):
            out.append(part)  # a missing required field: name it, and stop descending
            break
    return out


def _union_tags() -> set[str]:
    from runtime.model.formats import Brain, Detect  # noqa: PLC0415 (only needed when reporting errors)

    return {
        typing.get_args(m.model_fields["kind"].annotation)[0]
        for union in (Detect, Brain)
        for m in typing.get_args(typing.get_args(union)[0])
    }


def _dotted(path: Sequence[str | int]) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out


def _model_at(model: type[BaseModel], path: Sequence[str | int],
              data: Any) -> type[BaseModel] | None:
    """The model class that validates the mapping at ``path`` (for 'expected one of …')."""
    current: Any = model
    for part in path:
        if isinstance(part, int):
            data = data[part] if isinstance(data, list) and part < len(data) else None
            continue
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return None
        info = next((f for n, f in current.model_fields.items()
                     if (f.alias or n) == part), None)
        if info is None:
            return None
        data = data.get(part) if isinstance(data, dict) else None
        current = _unwrap(info.annotation, data)
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def _unwrap(annotation: Any, data: Any) -> Any:
    """Find the BaseModel inside Optional/tuple/Annotated/discriminated-union annotations."""
    while True:
        origin = typing.get_origin(annotation)
        if origin is typing.Annotated:
            annotation = typing.get_args(annotation)[0]
        elif origin in (typing.Union, types.UnionType):
            models = [a for a in typing.get_args(annotation)
                      if isinstance(a, type) and issubclass(a, BaseModel)]
            tag = data.get("kind") if isinstance(data, dict) else None
            for candidate in models:
                kind = candidate.model_fields.get("kind")
                if kind is None or tag in typing.get_args(kind.annotation):
                    return candidate
            return models[0] if len(models) == 1 else None
        elif origin in (tuple, list):
            annotation = typing.get_args(annotation)[0]
        else:
            return annotation


def _explain(error: Any, model: type[BaseModel], loc: Sequence[str | int], data: Any) -> str:
    kind = error["type"]
    if kind == "extra_forbidden":
        owner = _model_at(model, loc[:-1], data)
        if owner is not None:
            allowed = [f.alias or n for n, f in owner.model_fields.items()]
            near = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            return f"unknown field{hint}; expected one of: {', '.join(allowed)}"
        return "unknown field"
    if kind == "missing":
        return "required field is missing"
    message: str = error["msg"]
    return message.removeprefix("Value error, ")


# ---------------------------------------------------------------- files


def _parse(path: Path) -> list[Any] | ConfigError:
    """The YAML documents in ``path``, or the one error that says why there are none."""
    try:
        return list(_yaml().load_all(read_text(path)))
    except UnreadableError as exc:
        return ConfigError(str(path), 0, "", str(exc))
    except MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        return ConfigError(str(path), (mark.line + 1) if mark else 0, "",
                           f"not valid YAML: {exc.problem or exc.context}")
    except YAMLError as exc:
        return ConfigError(str(path), 0, "", f"not valid YAML: {exc}")
    except RecursionError:  # `[[[[…` deeper than the parser's stack
        return ConfigError(str(path), 0, "", "not valid YAML: nested too deeply")


def _documents(path: Path, into: ConfigSet) -> Iterator[CommentedMap]:
    docs = _parse(path)
    if isinstance(docs, ConfigError):
        into.errors.append(docs)
        # What the file defines is unknown; its name is the best guess (a persona's
        # must match it), so references to it are not reported again as missing.
        into.invalid.update({("Persona", path.stem), ("RepairPolicy", path.stem)})
        return
    for doc in docs:
        if doc is None:
            continue
        if not isinstance(doc, CommentedMap):
            into.errors.append(ConfigError(
                str(path), _line_at(doc, ()), "",
                "expected a mapping with apiVersion, kind, metadata, spec"))
            continue
        yield doc


def load_file(path: Path, into: ConfigSet) -> None:
    """Validate every document in ``path`` and add it (or its errors) to ``into``."""
    for doc in _documents(path, into):
        kind = doc.get("kind")
        model = KINDS.get(kind) if isinstance(kind, str) else None
        metadata = doc.get("metadata")
        name = metadata.get("name") if isinstance(metadata, dict) else None
        if model is None:
            into.errors.append(ConfigError(
                str(path), _line_at(doc, ("kind",)), "kind",
                f"expected one of {', '.join(KINDS)}, got {kind!r}"))
            if isinstance(name, str):  # a misspelled kind: whatever it meant is invalid
                into.invalid.update({("Persona", name), ("RepairPolicy", name)})
            continue
        try:
            value = model.model_validate(doc)
        except ValidationError as exc:
            for err in exc.errors():
                loc = _present_path(doc, err["loc"])
                if err["type"] == "union_tag_invalid":
                    loc.append("kind")
                into.errors.append(ConfigError(
                    str(path), _line_at(doc, loc), _dotted(loc),
                    _explain(err, model, loc, doc)))
            if isinstance(name, str):
                into.invalid.add((kind, name))
            continue
        _add(value, Located(value, str(path), doc), path, into)


def _add(value: Persona | RepairPolicy | Fleet, located: Located[Any], path: Path,
         into: ConfigSet) -> None:
    if isinstance(value, Fleet):
        if into.fleet_file is not None:
            into.errors.append(ConfigError(str(path), located.line_of(), "kind",
                                           f"a second Fleet; the first is in {into.fleet_file}"))
        into.fleet, into.fleet_file, into.fleet_located = value, str(path), located
        return
    table: dict[str, Located[Any]] = (
        into.personas if isinstance(value, Persona) else into.policies)
    if isinstance(value, Persona) and path.stem != value.name:
        into.errors.append(ConfigError(
            str(path), located.line_of("metadata", "name"), "metadata.name",
            f"persona {value.name!r} must live in {value.name}.yaml: the file name is the "
            "systemd instance name"))
    if (first := table.get(value.name)) is not None:
        into.errors.append(ConfigError(
            str(path), located.line_of("metadata", "name"), "metadata.name",
            f"{value.kind} {value.name!r} is already defined in {first.file}:"
            f"{first.line_of('metadata', 'name')}"))
        return
    table[value.name] = located


def _cross_check(config: ConfigSet) -> None:
    """What no single file can know: references between files and uniqueness of keys."""
    keys: dict[str, Located[Persona]] = {}
    for persona in config.personas.values():
        spec = persona.value.spec
        if (other := keys.get(spec.identity.nkey)) is not None:
            config.errors.append(ConfigError(
                persona.file, persona.line_of("spec", "identity", "nkey"), "spec.identity.nkey",
                f"the same nkey as persona {other.value.name!r} ({other.file}): every persona "
                "needs its own identity"))
        keys.setdefault(spec.identity.nkey, persona)
        for index, name in enumerate(spec.policies):
            if (name not in config.policies and ("RepairPolicy", name) not in config.invalid
                    and not config.unlisted):
                config.errors.append(ConfigError(
                    persona.file, persona.line_of("spec", "policies", index),
                    f"spec.policies[{index}]",
                    f"no RepairPolicy named {name!r}; known: "
                    f"{', '.join(sorted(config.policies)) or 'none'}"))
    if not config.personas:
        return  # a policy-only directory: nothing to resolve veto names against
    fleet = config.fleet_located
    for index, name in enumerate(config.fleet.spec.quorum.veto):
        if name not in config.personas and not config.unlisted:
            where = ("spec", "quorum", "veto", index)
            config.errors.append(ConfigError(
                fleet.file if fleet else "(built-in fleet defaults)",
                fleet.line_of(*where) if fleet else 0, _dotted(where),
                f"veto names persona {name!r}, which is not defined"))
    for policy in config.policies.values():
        for index, remedy in enumerate(policy.value.spec.remedies):
            for vi, name in enumerate(remedy.quorum.veto if remedy.quorum else ()):
                if (name not in config.personas and ("Persona", name) not in config.invalid
                        and not config.unlisted):
                    path = ("spec", "remedies", index, "quorum", "veto", vi)
                    config.errors.append(ConfigError(
                        policy.file, policy.line_of(*path), _dotted(path),
                        f"veto names persona {name!r}, which is not defined"))


def _check_windows(config: ConfigSet) -> None:
    """A maintenance window may hold only policies that exist (a typo would hold nothing)."""
    if config.unlisted or not config.policies:
        return  # unreadable, or a fleet.yaml checked alone: nothing to resolve against
    for wi, window in enumerate(config.fleet.spec.maintenanceWindows):
        for pi, name in enumerate(window.policies):
            if name not in config.policies and ("RepairPolicy", name) not in config.invalid:
                path = ("spec", "maintenanceWindows", wi, "policies", pi)
                file, line = _fleet_where(config, *path)
                config.errors.append(ConfigError(
                    file, line, _dotted(path), f"no RepairPolicy named {name!r}; known: "
                    f"{', '.join(sorted(config.policies)) or 'none'}"))


def _fleet_where(config: ConfigSet, *path: str | int) -> tuple[str, int]:
    fleet = config.fleet_located
    return (fleet.file, fleet.line_of(*path)) if fleet else ("(built-in fleet defaults)", 0)


def _check_bus_users(config: ConfigSet) -> None:
    """An operator or watcher needs a key of its own: the bus could not tell it from a
    persona (``render nats`` refuses such a fleet), and it would sign as that persona."""
    owners = {p.value.spec.identity.nkey: f"persona {p.value.name!r} ({p.file})"
              for p in config.personas.values()}
    spec = config.fleet.spec
    for group, users in (("operators", spec.operators), ("watchers", spec.watchers)):
        for index, user in enumerate(users):
            where = ("spec", group, index, "nkey")
            if (owner := owners.get(user.nkey)) is not None:
                file, line = _fleet_where(config, *where)
                config.errors.append(ConfigError(
                    file, line, _dotted(where),
                    f"the same nkey as {owner}: every persona, operator and watcher needs "
                    "its own key"))
            owners.setdefault(user.nkey, f"{group[:-1]} {user.name!r}")


def _check_quorums(config: ConfigSet) -> None:
    """A quorum no set of agents can ever meet is refused now, not found at 3 a.m.

    The approvers are the proposer and the personas with the ``vote`` duty, so no
    quorum can need more; the evidence paths are those a voter can name for the
    policy's finding (``runtime.model.paths``).
    """
    if not config.personas or config.unlisted:
        return  # a policy-only directory, or one we could not read: nothing to count
    voters = {p.value.name for p in config.personas.values() if "vote" in p.value.spec.duties}
    for policy in config.policies.values():
        spec = policy.value.spec
        proposers = {p.value.name for p in config.personas.values()
                     if policy.value.name in p.value.spec.policies
                     and "propose" in p.value.spec.duties}
        if not proposers:
            continue  # nobody runs it, so nobody is asked
        reachable = len(voters) + (1 if proposers - voters else 0)
        available = paths.providable(spec.detect)
        for index, remedy in enumerate(spec.remedies):
            quorum = remedy.quorum_under(config.fleet.spec.quorum)
            if quorum is None:
                continue
            own = remedy.quorum is not None
            where = ("spec", "remedies", index, "quorum") if own else ("spec", "remedies", index)
            if quorum.approvals > reachable:
                config.errors.append(ConfigError(
                    policy.file, policy.line_of(*where, "approvals") if own
                    else policy.line_of(*where), _dotted((*where, "approvals")),
                    f"needs {quorum.approvals} approvals{'' if own else ' (the fleet default)'}"
                    f", but at most {reachable} agents can approve (the proposer and the "
                    f"personas with the vote duty: {', '.join(sorted(voters)) or 'none'})"))
            rule = quorum.evidence
            missing = sorted(set(rule.requires) - available)
            if missing or rule.distinct > len(available):
                config.errors.append(ConfigError(
                    policy.file, policy.line_of(*where, "evidence") if own
                    else policy.line_of(*where), _dotted((*where, "evidence")),
                    f"asks for {rule.short()}, but a {spec.detect.kind} finding can only be "
                    f"seen by {', '.join(sorted(available))}"))


def _check_prompts(config: ConfigSet) -> None:
    """A model brain's templates must exist next to the persona file and parse."""
    for persona in config.personas.values():
        brain = persona.value.spec.brain
        if isinstance(brain, AnthropicBrain):
            template = Path(persona.file).parent / brain.template(persona.value.name)
            if (problem := check_template(template)) is not None:
                config.errors.append(ConfigError(
                    persona.file, persona.line_of("spec", "brain", "prompt"),
                    "spec.brain.prompt", problem))


def config_paths(directory: Path) -> list[Path]:
    """What a config directory holds: ``personas/``, ``policies/`` and an optional fleet.yaml.

    Only these are read, so a repository checkout works as a config directory
    without its other YAML files being taken for configuration.
    """
    paths = [directory / "personas", directory / "policies"]
    fleet = directory / "fleet.yaml"
    # lexists: a dangling symlink or a directory named fleet.yaml is an error to
    # report, not a missing file to replace silently with the built-in defaults.
    return [*paths, fleet] if os.path.lexists(fleet) else paths


def yaml_files(paths: Iterable[Path], into: ConfigSet) -> list[Path]:
    """The YAML files under ``paths`` (files are taken as given), in a stable order.

    A directory that cannot be listed is reported in ``into``, never skipped in
    silence. Symlinked subdirectories are not followed (no loops); a symlinked file
    is read.
    """
    out: list[Path] = []
    for path in paths:
        # A directory named like a YAML file (fleet.yaml made a directory by mistake)
        # is read as the file it should be, and refused as not a regular file.
        walk = path.is_dir() and path.suffix not in (".yaml", ".yml")
        out.extend(_walk(path, into) if walk else [path])
    return out


def _walk(top: Path, into: ConfigSet) -> list[Path]:
    def unlisted(exc: OSError) -> None:
        where = str(exc.filename or top)
        into.errors.append(ConfigError(where, 0, "",
                                       f"cannot read the directory: {exc.strerror or exc}"))
        into.unlisted.append(where)

    found: list[Path] = []
    def wanted(name: str) -> bool:
        # Hidden below `top` only: a config dir may itself live under ~/.config.
        return Path(name).suffix in (".yaml", ".yml") and not name.startswith(".")

    for root, dirs, files in os.walk(top, onerror=unlisted):
        # A directory named like a YAML file is taken for one, to be refused as not a
        # regular file rather than skipped; it is not descended into.
        found.extend(Path(root, name) for name in [*files, *dirs] if wanted(name))
        dirs[:] = [d for d in dirs if not d.startswith(".") and not wanted(d)]
    return sorted(found)


def load(paths: Iterable[Path], *, strict: bool = True) -> ConfigSet:
    """Load and cross-check every YAML file under ``paths``.

    With ``strict`` (the default) any error raises ConfigInvalidError carrying all
    of them; otherwise the errors are returned in ``ConfigSet.errors``.
    """
    config = ConfigSet()
    paths = list(paths)
    for path in paths:
        if not os.path.lexists(path):
            config.errors.append(ConfigError(str(path), 0, "", "no such file or directory"))
    for path in yaml_files((p for p in paths if os.path.lexists(p)), config):
        load_file(path, config)
    _cross_check(config)
    _check_bus_users(config)
    _check_quorums(config)
    _check_windows(config)
    _check_prompts(config)
    if strict and config.errors:
        raise ConfigInvalidError(config.errors)
    return config


def bus_urls(config: ConfigSet, environ: Mapping[str, str] = os.environ) -> tuple[str, ...]:
    """The bus to connect to: ``$ZETA_NATS_URL`` (comma-separated) overrides fleet.yaml.

    Raises ValueError naming the variable when one of its URLs is not a bus URL
    (fleet.yaml's own are checked when it is loaded).
    """
    if override := environ.get("ZETA_NATS_URL", "").strip():
        urls = tuple(u.strip() for u in override.split(",") if u.strip())
        for url in urls:
            try:
                check_bus_url(url)
            except ValueError as exc:
                raise ValueError(f"$ZETA_NATS_URL: {exc}") from None
        return urls
    return config.fleet.spec.bus.urls
