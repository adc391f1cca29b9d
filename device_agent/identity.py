"""The device's identity: its Ed25519 key (0600) and what enrollment gave it.

The key is generated on first start and never leaves the device; the server learns the public half
at enrollment, when the device signs the server's one-time nonce with it. Enrollment returns the
device id, an access token (sent as ``Authorization: Bearer`` on every device call) and the TUF
bootstrap (the trusted root and the metadata/targets URLs). All of it is stored under
``<state_dir>/identity/`` with mode 0600, written atomically.
"""

from __future__ import annotations

import json
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bundles.contract import EnrollmentRecord, to_dict
from bundles.durable import atomic_write_bytes, atomic_write_json
from bundles.errors import KeyFileError
from device_agent.statefiles import StateFiles

KEY_FILE = "device.key"
ENROLLMENT_FILE = "enrollment.json"
ROOT_FILE = "root.json"


def load_or_create_key(identity_dir: Path) -> Ed25519PrivateKey:
    """The device key, generated (PKCS#8 PEM, mode 0600) on first use.

    Raises:
        KeyFileError: the key file is readable by group or others, or is not an Ed25519 key.
    """
    path = identity_dir / KEY_FILE
    if not path.exists():
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        identity_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        atomic_write_bytes(path, pem, mode=0o600)
        return key
    return _load_key(path)


def _load_key(path: Path) -> Ed25519PrivateKey:
    if stat.S_IMODE(path.stat().st_mode) & 0o077:
        raise KeyFileError(f"device key {path} is readable by group or others: chmod 600 it")
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError) as e:
        raise KeyFileError(f"device key {path} is not a valid PEM private key") from e
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"device key {path} is not an Ed25519 key")
    return key


def public_key_hex(key: Ed25519PrivateKey) -> str:
    """The raw 32-byte public key as hex (what the enroll API takes)."""
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return raw.hex()


@dataclass(frozen=True)
class Enrollment(EnrollmentRecord):
    """What the server said at enrollment (persisted, 0600: it holds the access token)."""

    def save(self, identity_dir: Path, trusted_root: dict[str, Any]) -> None:
        atomic_write_bytes(identity_dir / ROOT_FILE, json.dumps(trusted_root).encode("utf-8"), mode=0o600)
        atomic_write_json(identity_dir / ENROLLMENT_FILE, to_dict(self), mode=0o600)

    @classmethod
    def load(cls, identity_dir: Path, files: StateFiles | None = None) -> Enrollment | None:
        """The stored enrollment, or ``None`` if this device was never enrolled (or its record is damaged).

        A damaged record is set aside and reported: the access token cannot be rebuilt, so the
        device serves what it has installed until it is enrolled again.
        """
        files = files or StateFiles(identity_dir.parent)
        found: Enrollment | None = files.load(
            identity_dir / ENROLLMENT_FILE, Enrollment, None,
            action="not enrolled any more: serving the installed models; run 'edgefleet-agent enroll' again",
        )  # fmt: skip
        return found


def trusted_root_bytes(identity_dir: Path) -> bytes:
    """The TUF root the server handed over at enrollment."""
    return (identity_dir / ROOT_FILE).read_bytes()
