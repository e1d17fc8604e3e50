"""Where a persona's secrets come from: systemd credentials, else the fleet's credentials dir.

Secrets never live in persona, policy or fleet files. Under systemd,
``LoadCredential=nkey.seed:…`` places them in ``$CREDENTIALS_DIRECTORY``, readable
only by the service. Outside systemd (development, the lab, tests) they are read
from ``<fleet credentialsDir>/<persona>/``, where ``zeta-agent keygen`` writes them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from bus.keys import Signer, generate_user_seed
from runtime.config.files import UnreadableError, read_regular, write_atomic
from runtime.model.formats import Fleet, Persona

SEED_FILE = "nkey.seed"
KUBECONFIG_FILE = "kubeconfig"
ANTHROPIC_KEY_FILE = "anthropic-api-key"
OPTIONAL_FILES = (KUBECONFIG_FILE, ANTHROPIC_KEY_FILE)
SEED_LIMIT = 4096  # a seed is 58 characters; anything big is the wrong file
"""Credentials a persona may have besides its seed (``zeta-agent render unit`` lists them)."""


class CredentialError(Exception):
    """A secret is missing or does not belong to the persona."""


def seed_file(credentials_dir: Path, owner: str) -> Path:
    """``<credentials dir>/<owner>/nkey.seed``: written by keygen, read outside systemd."""
    return credentials_dir / owner / SEED_FILE


def credential_path(name: str, persona: str, fleet: Fleet,
                    environ: Mapping[str, str] = os.environ) -> Path:
    """The file a credential is read from, by the documented order."""
    if given := environ.get("CREDENTIALS_DIRECTORY"):
        return Path(given) / name
    return Path(fleet.spec.credentialsDir) / persona / name


def load_signer(persona: Persona, fleet: Fleet,
                environ: Mapping[str, str] = os.environ) -> Signer:
    """The persona's signing key, checked against the public key in its persona file."""
    path = credential_path(SEED_FILE, persona.name, fleet, environ)
    try:
        signer = Signer(read_regular(path, SEED_LIMIT))
    except UnreadableError as exc:
        raise CredentialError(f"the nkey seed {path}: {exc}; create one with "
                              f"`zeta-agent keygen {persona.name} --write`") from None
    except ValueError as exc:
        raise CredentialError(f"{path}: {exc}") from None
    if signer.public_key != persona.spec.identity.nkey:
        raise CredentialError(
            f"{path} holds the key {signer.public_key}, but persona {persona.name!r} is "
            f"configured with {persona.spec.identity.nkey}: refusing to sign as someone else")
    return signer


def write_seed(credentials_dir: Path, name: str, *, force: bool = False,
               seed: bytes | None = None) -> str:
    """Create ``<credentials_dir>/<name>/nkey.seed`` (0600, directory 0700); return its public key.

    ``seed`` defaults to a fresh one. Written whole or not at all (temporary file,
    fsync, then a link or rename into place), so a full disk never leaves an empty
    seed behind. Refuses to replace an existing seed unless ``force``: a lost seed is
    a lost identity.
    """
    path = seed_file(credentials_dir, name)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    seed = seed or generate_user_seed()
    try:
        write_atomic(path, seed + b"\n", mode=0o600, replace=force)
    except FileExistsError:
        raise CredentialError(f"{path} exists; pass --force to replace the key") from None
    return Signer(seed).public_key
