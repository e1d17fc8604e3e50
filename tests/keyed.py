"""A configuration directory whose personas and operator have fresh keys, for bus tests.

The shipped persona files carry placeholder keys whose seeds exist nowhere; this
copies them with new keys (``lab.fleet.prepare_config``) and adds an operator, so
a test can sign as anyone the configuration knows.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from bus.keys import Signer, generate_user_seed
from lab import tools
from lab.fleet import prepare_config
from runtime.config.credentials import SEED_FILE
from tests.conftest import REPO

OPERATOR = tools.EXAMPLE_OPERATOR


@dataclass(frozen=True)
class Keyed:
    config_dir: Path
    signers: dict[str, Signer]  # every persona, and the operator

    @property
    def keys(self) -> dict[str, str]:
        return {n: s.public_key for n, s in self.signers.items() if n != OPERATOR}

    @property
    def operators(self) -> dict[str, str]:
        return {OPERATOR: self.signers[OPERATOR].public_key}


def keyed_config(directory: Path, nats_url: str) -> Keyed:
    """The shipped personas and policies with fresh keys, the bus at ``nats_url``."""
    operator = Signer(generate_user_seed())
    personas = prepare_config(REPO, directory, tick=None, nats_url=nats_url, fleet_spec={
        "operators": [{"name": OPERATOR, "nkey": operator.public_key}]})
    signers = {name: Signer((directory / "credentials" / name / SEED_FILE).read_bytes())
               for name in personas}
    return Keyed(directory, {**signers, OPERATOR: operator})
