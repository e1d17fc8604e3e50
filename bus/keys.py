"""NATS nkey identities: every persona signs with its own ed25519 user key."""

from __future__ import annotations

import base64
import binascii

import nkeys
from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey, VerifyKey

_USER_PREFIX = nkeys.PREFIX_BYTE_USER


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




def _raw_public(key: str) -> bytes:
    return base64.b32decode(key.encode("ascii"))[1:33]


class Signer:
    """Signs with a persona's nkey seed. The seed never leaves this process."""

    def __init__(self, seed: bytes) -> None:
        self.seed = seed.strip()  # nats-py needs it to answer the server's nonce
        try:
            self._pair = nkeys.from_seed(bytearray(self.seed))
        except (nkeys.NkeysError, ValueError, binascii.Error) as exc:
            raise ValueError("not an nkey seed (expected a line starting with 'SU')") from exc
        self.public_key: str = self._pair.public_key.decode("ascii")

    def sign(self, data: bytes) -> bytes:
        signature: bytes = self._pair.sign(data)
        return signature


def verify(public_key: str, data: bytes, signature: bytes) -> bool:
    """True if ``signature`` is ``public_key``'s ed25519 signature of ``data``."""
    try:
        VerifyKey(_raw_public(public_key)).verify(data, signature)
    except (BadSignatureError, ValueError, TypeError):
        return False
    return True


def generate_user_seed() -> bytes:
    """A fresh user nkey seed (``SU…``)."""
    raw = bytes(SigningKey.generate())
    seed: bytes = nkeys.encode_seed(raw, _USER_PREFIX)
    return seed
