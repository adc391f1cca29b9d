"""Secrets: generation and keyed hashing of API keys, device access tokens and enrollment tokens.

Secrets are 256-bit random strings with a short kind prefix (``efk_`` admin key, ``efd_`` device
token, ``efe_`` enrollment token) so a leaked one is recognisable. Only an HMAC-SHA256 of each
secret under the server's pepper is stored: a database dump alone cannot authenticate anyone.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

ADMIN_KEY_PREFIX = "efk_"
DEVICE_TOKEN_PREFIX = "efd_"  # noqa: S105 - a prefix, not a secret
ENROLL_TOKEN_PREFIX = "efe_"  # noqa: S105 - a prefix, not a secret


def new_secret(prefix: str) -> str:
    """A fresh random secret with its kind prefix."""
    return prefix + secrets.token_urlsafe(32)


def hash_secret(secret: str, pepper: str) -> str:
    """The stored form of a secret: hex HMAC-SHA256 keyed by the server pepper."""
    return hmac.new(pepper.encode(), secret.encode(), hashlib.sha256).hexdigest()


def display_prefix(secret: str) -> str:
    """The first characters of a secret, safe to list so an admin can tell keys apart."""
    return secret[:10]
