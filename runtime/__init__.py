"""Zeta agents runtime: what a host installs (with ``bus``).

One room per concern, layered (docs/architecture.md, "Where the code is"): ``model``
and ``core`` are pure, ``config`` reads files, ``kube``, ``host`` and ``brain`` talk to
the outside, ``agent`` is one persona's process, ``ops`` what an operator runs.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("zeta-agent")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"
