"""Cache keys: one fixed-size digest per (model, version, normalization, exact text).

Why a digest of a length-prefixed encoding: joining parts with a separator is ambiguous
(``("a:b", "c")`` vs ``("a", "b:c")``); prefixing each part with its byte length is not. The
text is hashed exactly as received — two texts that differ only in whitespace or Unicode form
are different inputs to the model and may embed differently.
"""

from __future__ import annotations

import hashlib
import struct

from polyray.types import ModelRef

KEY_BYTES = 16
# Bumped when the encoding below changes, so old entries in a shared tier are never read as new.
KEY_SCHEME = b"polyray-cache-key/1"


def _part(value: str) -> bytes:
    # surrogatepass: a lone surrogate is still an exact, distinct input rather than an error.
    data = value.encode("utf-8", "surrogatepass")
    return struct.pack(">Q", len(data)) + data


def cache_key(model: ModelRef, normalization: str, text: str) -> bytes:
    """16-byte blake2b digest naming one input to one model version under one normalization."""
    h = hashlib.blake2b(digest_size=KEY_BYTES, person=b"polyray-cache")
    h.update(_part(KEY_SCHEME.decode()))
    for part in (model.name, model.version, normalization, text):
        h.update(_part(part))
    return h.digest()


def key_hex(key: bytes) -> str:
    return key.hex()


def key_from_hex(text: str) -> bytes:
    """Parse a hex key (a recorded trace line); raises ValueError on anything else."""
    return bytes.fromhex(text.strip())
