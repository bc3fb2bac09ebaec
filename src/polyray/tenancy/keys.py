"""API keys: generated once, shown once, stored as a SHA-256 digest.

A key is ``pk-<role letter><8 hex id>_<43 chars of url-safe base64>``: 256 random bits, so a plain
SHA-256 digest is enough to store it (a slow password hash protects low-entropy secrets; this
one cannot be guessed) and lookups stay O(1) per request. The visible prefix lets an operator
tell keys apart in listings without storing the secret.
"""

from __future__ import annotations

import hashlib
import secrets

CLIENT_ROLE = "client"
ADMIN_ROLE = "admin"
_ROLE_LETTER = {CLIENT_ROLE: "c", ADMIN_ROLE: "a"}


def generate_key(role: str) -> tuple[str, str]:
    """(key, prefix) for ``role``; the key is returned to the caller once and never stored."""
    prefix = f"pk-{_ROLE_LETTER[role]}{secrets.token_hex(4)}"
    return f"{prefix}_{secrets.token_urlsafe(32)}", prefix


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()
