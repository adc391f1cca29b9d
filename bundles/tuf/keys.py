"""Ed25519 key files for the four TUF roles.

A private key is a PKCS#8 PEM file with mode 0600, written atomically (temp file created 0600,
fsync, ``os.replace``) so a crash never leaves a half-written or world-readable key. Next to it,
``<key>.pub.json`` holds the public key as a TUF key dict, safe to copy around.

Loading refuses a key file that group or others may read (:class:`KeyFileError`): a key that was
exposed must be rotated, not used. Private key material never appears in a repr, a log line or an
exception message; parse errors are raised ``from None`` so no chained traceback carries the bytes.
"""

from __future__ import annotations

import json
import logging
import stat
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from securesystemslib.signer import CryptoSigner, Key, Signer, SSlibKey

from bundles.errors import KeyFileError
from bundles.tuf.common import atomic_write_bytes

logger = logging.getLogger(__name__)

PRIVATE_KEY_MODE = 0o600
PUBLIC_SUFFIX = ".pub.json"
_MAX_KEY_FILE_BYTES = 64 * 1024


def generate_key(path: str | Path, *, overwrite: bool = False) -> Signer:
    """Create a new Ed25519 key at ``path`` (mode 0600) and ``<path>.pub.json``; return its signer.

    Refuses to replace an existing key unless ``overwrite``: losing a release key means a root rotation.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise KeyFileError(f"key file {path} already exists; refusing to overwrite it")
    signer = CryptoSigner(Ed25519PrivateKey.generate())
    atomic_write_bytes(path, signer.private_bytes, PRIVATE_KEY_MODE)
    atomic_write_bytes(public_key_path(path), _public_json(signer.public_key), 0o644)
    logger.info("generated ed25519 key %s at %s", signer.public_key.keyid[:12], path)
    return signer


def load_signer(path: str | Path) -> Signer:
    """Load the private key at ``path`` as a signer, after checking that only its owner can read it."""
    path = Path(path)
    check_key_file_mode(path)
    pem = _read_small(path)
    try:
        private_key = load_pem_private_key(pem, password=None)
    except (ValueError, TypeError):
        raise KeyFileError(f"key file {path} is not an unencrypted PKCS#8 PEM private key") from None
    if not isinstance(private_key, Ed25519PrivateKey):
        raise KeyFileError(f"key file {path} holds a {type(private_key).__name__}, expected an Ed25519 key")
    return CryptoSigner(private_key)


def check_key_file_mode(path: Path) -> None:
    """Raise :class:`KeyFileError` if ``path`` is missing, not a regular file, or readable by group/others."""
    try:
        st = path.stat()
    except OSError as e:
        raise KeyFileError(f"cannot read key file {path}: {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise KeyFileError(f"key file {path} is not a regular file")
    if st.st_mode & 0o077:
        raise KeyFileError(
            f"key file {path} has mode {stat.S_IMODE(st.st_mode):04o}; it must be 0600 (run: chmod 600 {path})"
        )


def public_key(source: str | Path | Signer | Key) -> Key:
    """The public key of a signer, a private key file, or a ``.pub.json`` file."""
    if isinstance(source, Signer):
        return source.public_key
    if isinstance(source, Key):
        return source
    path = Path(source)
    if path.name.endswith(PUBLIC_SUFFIX):
        return _load_public_json(path)
    return load_signer(path).public_key


def public_key_path(private_key_path: str | Path) -> Path:
    """Where the public half of a key file is written."""
    p = Path(private_key_path)
    return p.with_name(p.name + PUBLIC_SUFFIX)


def key_to_dict(key: Key | Signer) -> dict[str, Any]:
    """A JSON-ready dict of a public key: the TUF key fields plus ``keyid``."""
    k = key.public_key if isinstance(key, Signer) else key
    return {"keyid": k.keyid, **k.to_dict()}


def key_from_dict(data: dict[str, Any]) -> Key:
    """The public key described by :func:`key_to_dict`'s output (or a plain TUF key dict with ``keyid``)."""
    fields = dict(data)
    keyid = fields.pop("keyid", None)
    try:
        if keyid is None:
            return SSlibKey.from_dict(_default_keyid(fields), fields)
        return Key.from_dict(str(keyid), fields)
    except (KeyError, ValueError, TypeError) as e:
        raise KeyFileError(f"not a valid public key dict: {e}") from e


def _default_keyid(fields: dict[str, Any]) -> str:
    """The keyid securesystemslib computes for a key without one."""
    probe = SSlibKey.from_dict("probe", dict(fields))
    return SSlibKey.from_crypto(probe._crypto_key(), scheme=probe.scheme).keyid  # noqa: SLF001


def _public_json(key: Key) -> bytes:
    return json.dumps(key_to_dict(key), sort_keys=True, indent=2).encode() + b"\n"


def _load_public_json(path: Path) -> Key:
    try:
        data = json.loads(_read_small(path))
    except json.JSONDecodeError as e:
        raise KeyFileError(f"public key file {path} is not JSON: {e}") from e
    if not isinstance(data, dict):
        raise KeyFileError(f"public key file {path} does not hold a key object")
    return key_from_dict(data)


def _read_small(path: Path) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read(_MAX_KEY_FILE_BYTES + 1)
    except OSError as e:
        raise KeyFileError(f"cannot read key file {path}: {e.strerror}") from None
    if len(data) > _MAX_KEY_FILE_BYTES:
        raise KeyFileError(f"key file {path} is larger than {_MAX_KEY_FILE_BYTES} bytes")
    return data


__all__ = [
    "PRIVATE_KEY_MODE",
    "check_key_file_mode",
    "generate_key",
    "key_from_dict",
    "key_to_dict",
    "load_signer",
    "public_key",
    "public_key_path",
]
