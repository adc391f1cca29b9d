"""Who is calling: an admin API key or a device (plain data, shared by the API layer and services)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class AdminPrincipal:
    """An authenticated admin API key."""

    key_id: int
    name: str
    role: str

    @property
    def actor(self) -> str:
        """How the audit log names this caller."""
        return f"key:{self.key_id}:{self.name}"


@dataclass(frozen=True)
class DevicePrincipal:
    """An authenticated device."""

    device_id: str
    status: str
