"""Tests that need something beyond the venv (Go, a Kubernetes cluster, systemd-nspawn).

Locally a missing prerequisite skips the test with the reason (``-ra`` lists it). In
CI (``CI=true``, set by .ci/run) it fails: a green CI run must mean every test ran,
not that the machine lacked what the interesting tests need.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import NoReturn

import pytest


def in_ci(environ: Mapping[str, str] = os.environ) -> bool:
    return environ.get("CI") == "true"


def missing(reason: str, environ: Mapping[str, str] = os.environ) -> NoReturn:
    """Skip the current test (fail it under ``CI=true``) because ``reason``."""
    if in_ci(environ):
        pytest.fail(f"prerequisite missing, and CI=true forbids skipping: {reason}",
                    pytrace=False)
    pytest.skip(reason)
