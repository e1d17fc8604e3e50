"""NATS nkey identities: every persona signs with its own ed25519 user key."""

from __future__ import annotations

import base64
import binascii

import nkeys

_USER_PREFIX = nkeys.PREFIX_BYTE_USER
_OPERATOR_PREFIX = nkeys.PREFIX_BYTE_OPERATOR


def _check_public(key: str, prefix: int, letter: str) -> str:
    if not key.startswith(letter):
        raise ValueError(f"expected a public nkey starting with {letter!r}, got {key[:4]!r}…")
    try:
        raw = base64.b32decode(key.encode("ascii"))
    except (binascii.Error, UnicodeEncodeError) as exc:
        raise ValueError("expected a base32 nkey (A-Z, 2-7)") from exc
    if len(raw) != 35 or raw[0] != prefix:
        raise ValueError("expected a 56-character public nkey")
    body, crc = raw[:-2], int.from_bytes(raw[-2:], "little")
    if nkeys.crc16(body) != crc:
        raise ValueError("nkey checksum does not match: the key was mistyped or truncated")
    return key


def check_user_public_key(key: str) -> str:
    """Return ``key`` if it is a well-formed public user nkey (``U…``), else raise ValueError."""
    return _check_public(key, _USER_PREFIX, "U")


def check_operator_public_key(key: str) -> str:
    """Return ``key`` if it is a well-formed public operator nkey (``O…``), else raise ValueError."""
    return _check_public(key, _OPERATOR_PREFIX, "O")
