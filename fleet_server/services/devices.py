"""Devices: enrollment, authentication, inventory, status changes and tags.

Enrollment flow: the device asks for a nonce (``create_nonce``), signs the nonce bytes with its own
Ed25519 key and sends the fleet enrollment token, its public key, the nonce, the signature and its
inventory (``enroll``). The server checks the token (unexpired, unrevoked, uses left), consumes the
nonce (single use), verifies the signature, then creates the device (``pending`` when approval is
required, else ``accepted``) or re-enrolls a known key, and returns a fresh access token. Only an
HMAC of that token is stored; revoking it (reject, decommission, re-enroll) locks the old one out.

The device id is derived from the public key (``dev-`` + 16 hex of its sha256), so one key is one
device however often it enrolls.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import secrets
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from sqlalchemy import delete, or_, select, text, update
from sqlalchemy.orm import Session

from bundles.contract import InstalledBundle, parse, to_dict
from bundles.errors import AuthError, ConfigError
from bundles.selection import DeviceCapabilities
from fleet_server.audit import record
from fleet_server.db import utcnow
from fleet_server.errors import ConflictError, ForbiddenError, NotFoundError
from fleet_server.models import DEVICE_STATUSES, Device, DeviceTag, EnrollmentNonce, EnrollmentToken
from fleet_server.principals import DevicePrincipal
from fleet_server.security import DEVICE_TOKEN_PREFIX, hash_secret, new_secret
from fleet_server.services.json_guard import printable_json
from fleet_server.settings import Settings

MAX_INSTALLED = 100
log = logging.getLogger("fleet_server.devices")
LAST_SEEN_RESOLUTION_S = 60
_STATUS_ATTEMPTS = 3
# Which status an admin action moves a device to, and from which statuses it may.
TRANSITIONS: dict[str, tuple[str, tuple[str, ...]]] = {
    "approve": ("accepted", ("pending", "rejected")),
    "reject": ("rejected", ("pending", "accepted")),
    "decommission": ("decommissioned", ("pending", "accepted", "rejected")),
}
_AUTH_SQL = text("SELECT id, status FROM devices WHERE token_hash = :token_hash")


@dataclass(frozen=True)
class EnrollmentResult:
    """What a device gets back from enrolling."""

    device: Device
    access_token: str


def device_id_for(public_key: bytes) -> str:
    """The stable id of the device that holds ``public_key``."""
    return "dev-" + hashlib.sha256(public_key).hexdigest()[:16]


def create_nonce(session: Session, ttl_s: int) -> tuple[str, int]:
    """A fresh single-use challenge; expired ones are swept at the same time."""
    now = utcnow()
    session.execute(delete(EnrollmentNonce).where(EnrollmentNonce.expires_at < now))
    nonce = secrets.token_hex(32)
    session.add(EnrollmentNonce(nonce=nonce, expires_at=now + dt.timedelta(seconds=ttl_s)))
    return nonce, ttl_s


def enroll(session: Session, settings: Settings, request: dict[str, Any]) -> EnrollmentResult:
    """Enroll (or re-enroll) the device described by a validated enrollment request."""
    token = _consume_enrollment_token(session, settings, request["token"])
    public_key = _parse_hex(request["public_key"], "public_key", 32)
    _consume_nonce(session, request["nonce"])
    verify_possession(public_key, request["nonce"], _parse_hex(request["signature"], "signature", 64))
    device = session.get(Device, device_id_for(public_key))
    if device is None:
        device = _new_device(session, settings, public_key, token.fleet)
    elif device.status in ("rejected", "decommissioned"):
        raise ForbiddenError(f"device {device.id} is {device.status} and cannot enroll again")
    apply_inventory(device, request.get("inventory") or {})
    access_token = new_secret(DEVICE_TOKEN_PREFIX)
    device.token_hash = hash_secret(access_token, settings.token_pepper)
    device.last_seen_at = utcnow()
    record(session, actor=f"enroll-token:{token.id}", action="device.enroll", target_type="device",
           target_id=device.id, after=describe_device(device))  # fmt: skip
    log.info("device enrolled", extra={"device_id": device.id, "fleet": device.fleet, "status": device.status})
    return EnrollmentResult(device=device, access_token=access_token)


def _new_device(session: Session, settings: Settings, public_key: bytes, fleet: str) -> Device:
    status = "pending" if settings.require_approval else "accepted"
    device = Device(id=device_id_for(public_key), public_key=public_key.hex(), fleet=fleet, status=status,
                    capabilities={}, installed=[])  # fmt: skip
    session.add(device)
    return device


def _consume_enrollment_token(session: Session, settings: Settings, secret: str) -> EnrollmentToken:
    """Check the token and take one of its uses with one conditional UPDATE.

    The UPDATE re-checks every condition in the database, so concurrent enrollments on two server
    processes cannot take more uses than ``max_uses`` (the row is locked until the transaction ends,
    and a rolled-back enrollment gives its use back).
    """
    token = session.scalar(
        select(EnrollmentToken).where(EnrollmentToken.token_hash == hash_secret(secret, settings.token_pepper))
    )
    if token is None or token.revoked_at is not None:
        raise AuthError("unknown or revoked enrollment token")
    now = utcnow()
    if token.expires_at <= now:
        raise AuthError(f"enrollment token {token.prefix}… expired at {token.expires_at.isoformat()}")
    if token.max_uses is not None and token.uses >= token.max_uses:
        raise AuthError(f"enrollment token {token.prefix}… has been used {token.uses} times (its limit)")
    taken = session.execute(
        update(EnrollmentToken)
        .where(EnrollmentToken.id == token.id, EnrollmentToken.revoked_at.is_(None), EnrollmentToken.expires_at > now,
               or_(EnrollmentToken.max_uses.is_(None), EnrollmentToken.uses < EnrollmentToken.max_uses))
        .values(uses=EnrollmentToken.uses + 1)
        .execution_options(synchronize_session=False)
    )  # fmt: skip
    if _rowcount(taken) != 1:
        raise AuthError(f"enrollment token {token.prefix}… has no use left (a concurrent enrollment took the last)")
    session.expire(token, ["uses"])
    return token


def _consume_nonce(session: Session, nonce: str) -> None:
    """Delete the nonce if it is still valid; exactly one enrollment can do so."""
    deleted = session.execute(
        delete(EnrollmentNonce).where(EnrollmentNonce.nonce == nonce, EnrollmentNonce.expires_at > utcnow())
    )
    if _rowcount(deleted) != 1:
        raise AuthError("unknown or expired enrollment nonce: ask for a new one at /api/v1/enroll/challenge")


def _rowcount(result: Any) -> int:
    """Rows matched by an UPDATE or DELETE (both SQLite and PostgreSQL report it exactly)."""
    return int(result.rowcount)


def _parse_hex(value: str, field: str, length: int) -> bytes:
    try:
        raw = bytes.fromhex(value)
    except ValueError as e:
        raise ConfigError(f"{field}: not valid hex") from e
    if len(raw) != length:
        raise ConfigError(f"{field}: expected {length} bytes, got {len(raw)}")
    return raw


def verify_possession(public_key: bytes, nonce: str, signature: bytes) -> None:
    """Check the Ed25519 signature over the nonce bytes (the hex-decoded nonce; its ASCII form is accepted too)."""
    try:
        key = Ed25519PublicKey.from_public_bytes(public_key)
    except ValueError as e:
        raise ConfigError("public_key: not a valid Ed25519 public key") from e
    for message in (bytes.fromhex(nonce), nonce.encode()):
        try:
            key.verify(signature, message)
            return
        except InvalidSignature:
            continue
    raise AuthError("the signature over the enrollment nonce does not verify with the given public key")


def apply_inventory(device: Device, inventory: dict[str, Any]) -> None:
    """Store the inventory a device reports: capabilities JSON plus the indexed columns."""
    caps_data = inventory.get("capabilities", inventory)
    if caps_data:
        caps = DeviceCapabilities.from_dict(caps_data)
        device.capabilities = caps.to_dict()
        device.arch, device.os, device.python = caps.arch, caps.os, caps.python or None
        device.memory_mb, device.disk_free_mb = caps.memory_mb, caps.disk_free_mb
    hw_class = inventory.get("hw_class") or (caps_data or {}).get("hw_class")
    if isinstance(hw_class, str) and hw_class:
        device.hw_class = _bounded(hw_class, "hw_class", 64).lower()
    if isinstance(inventory.get("agent_version"), str):
        device.agent_version = _bounded(inventory["agent_version"], "agent_version", 32)
    if "installed" in inventory:
        device.installed = _installed(inventory["installed"])


def _bounded(text: str, field: str, max_chars: int) -> str:
    if len(text) > max_chars:
        raise ConfigError(f"inventory.{field}: at most {max_chars} characters")
    return text


def _installed(value: Any) -> list[dict[str, Any]]:
    """The reported installed bundles, each checked against the contract (the enrollment inventory is not
    typed by its route)."""
    if not isinstance(value, list) or len(value) > MAX_INSTALLED:
        raise ConfigError(f"inventory.installed: expected a list of at most {MAX_INSTALLED} bundles")
    return [to_dict(parse(InstalledBundle, item, f"inventory.installed[{i}]")) for i, item in enumerate(value)]


def authenticate_device(session: Session, settings: Settings, token: str) -> DevicePrincipal:
    """The device that holds ``token``; rejected and decommissioned devices are refused."""
    if not token.startswith(DEVICE_TOKEN_PREFIX):
        raise AuthError("this bearer token is not a device access token")
    row = session.execute(_AUTH_SQL, {"token_hash": hash_secret(token, settings.token_pepper)}).first()
    if row is None:
        raise AuthError("unknown or revoked device access token")
    if row.status in ("rejected", "decommissioned"):
        raise ForbiddenError(f"device {row.id} is {row.status}")
    return DevicePrincipal(device_id=row.id, status=row.status)


def get_device(session: Session, device_id: str) -> Device:
    """The device row, or a 404-mapped error."""
    device = session.get(Device, device_id)
    if device is None:
        raise NotFoundError(f"device {device_id} does not exist")
    return device


def touch_last_seen(session: Session, device_id: str) -> None:
    """Record that a device was heard from (throttled so polls do not become writes)."""
    cutoff = utcnow() - dt.timedelta(seconds=LAST_SEEN_RESOLUTION_S)
    session.execute(
        text("UPDATE devices SET last_seen_at = :now WHERE id = :id AND (last_seen_at IS NULL OR last_seen_at < :cut)"),
        {"now": utcnow(), "id": device_id, "cut": cutoff},
    )


def change_status(session: Session, *, device_id: str, action: str, actor: str) -> Device:
    """Approve, reject or decommission a device; reject and decommission revoke its access token.

    The change is a compare-and-set (``UPDATE ... WHERE status = <the status read>``): of concurrent
    actions on several processes, each one moves the device from the status it really has, once,
    and writes one audit entry; a status that changed meanwhile is read again and judged anew.
    """
    target, allowed_from = TRANSITIONS[action]
    device = get_device(session, device_id)
    for _ in range(_STATUS_ATTEMPTS):
        if device.status == target:
            return device
        if device.status not in allowed_from:
            raise ConflictError(f"device {device_id} is {device.status}; cannot {action} it")
        before = describe_device(device)
        if _compare_and_set_status(session, device, target):
            record(session, actor=actor, action=f"device.{action}", target_type="device", target_id=device_id,
                   before=before, after=describe_device(device))  # fmt: skip
            return device
    raise ConflictError(f"device {device_id} keeps changing status; retry the {action}")


def _compare_and_set_status(session: Session, device: Device, target: str) -> bool:
    """Move ``device`` to ``target`` if its row still has the status read; refreshes it either way."""
    values: dict[str, Any] = {"status": target}
    if target in ("rejected", "decommissioned"):
        values["token_hash"] = None
    moved = session.execute(
        update(Device).where(Device.id == device.id, Device.status == device.status).values(**values)
        .execution_options(synchronize_session=False)
    )  # fmt: skip
    session.refresh(device)
    return _rowcount(moved) == 1


def set_tags(session: Session, *, device_id: str, add: list[str], remove: list[str], actor: str) -> Device:
    """Add and remove tags on a device (idempotent)."""
    device = get_device(session, device_id)
    before = describe_device(device, session)
    current = set(device_tags(session, device_id))
    for tag in sorted(set(add) - current):
        session.add(DeviceTag(device_id=device_id, tag=tag))
    session.execute(delete(DeviceTag).where(DeviceTag.device_id == device_id, DeviceTag.tag.in_(remove)))
    session.flush()
    record(session, actor=actor, action="device.tags", target_type="device", target_id=device_id,
           before=before, after=describe_device(device, session))  # fmt: skip
    return device


def device_tags(session: Session, device_id: str) -> list[str]:
    """The tags of one device, sorted."""
    return sorted(session.scalars(select(DeviceTag.tag).where(DeviceTag.device_id == device_id)))


def describe_device(device: Device, session: Session | None = None) -> dict[str, Any]:
    """The public view of a device (never its token hash)."""
    out: dict[str, Any] = {
        "id": device.id, "fleet": device.fleet, "status": device.status, "public_key": device.public_key,
        "hw_class": device.hw_class, "arch": device.arch, "os": device.os, "python": device.python,
        "agent_version": device.agent_version, "memory_mb": device.memory_mb, "disk_free_mb": device.disk_free_mb,
        "capabilities": printable_json(device.capabilities), "installed": printable_json(device.installed),
        "enrolled_at": device.enrolled_at.isoformat() if device.enrolled_at else None,
        "last_seen_at": device.last_seen_at.isoformat() if device.last_seen_at else None,
    }  # fmt: skip
    if session is not None:
        out["tags"] = device_tags(session, device.id)
    return out


__all__ = ["DEVICE_STATUSES", "EnrollmentResult", "authenticate_device", "change_status", "create_nonce", "enroll"]
