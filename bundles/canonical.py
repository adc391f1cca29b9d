"""Canonical JSON and hashing: the same data always gives the same bytes and the same digest.

Manifests are hashed and signed as canonical JSON: keys sorted, no insignificant white space,
UTF-8, no NaN or infinity (they have no JSON form and would make two readers disagree). Floats are
written by Python's shortest round-trip ``repr``, so a value read back compares equal.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from bundles.errors import ManifestError

_CHUNK_BYTES = 1 << 20


def canonical_json(data: Any) -> bytes:
    """Serialise ``data`` to canonical JSON bytes; NaN/infinity are a :class:`ManifestError`."""
    try:
        text = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except ValueError as e:
        raise ManifestError(f"cannot encode as canonical JSON: {e}") from e
    except TypeError as e:
        raise ManifestError(f"cannot encode as JSON: {e}") from e
    return text.encode("utf-8")


def sha256_bytes(data: bytes) -> str:
    """Lowercase hex sha256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path) -> str:
    """Lowercase hex sha256 of a file, read in chunks so large models need little memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


__all__ = ["canonical_json", "sha256_bytes", "sha256_file"]
