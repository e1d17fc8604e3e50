"""Zeta agents runtime: configuration, scopes, the policy engine and the agent process."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("zeta-agent")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"
