"""Zeta agents bus: subjects, identities and (later) signed envelopes and quorum over NATS.

This package never imports ``runtime``: the wire contract must stay usable by
tools that do not load the agent (``nats`` watchers, audit verifiers).
"""
