"""The lab (distribution ``zeta-lab``, private, never installed on a host).

Test equipment that the product must not carry: the nats-server and control-plane
runners, the Go build cache, the node simulator, the fleet harness, the drill behind
``make lab`` and the docs generator. It depends on ``zeta-agent`` and ``rich``; nothing
under ``runtime`` or ``bus`` imports it (an import-linter contract).
"""
