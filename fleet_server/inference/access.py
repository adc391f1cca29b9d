"""Who may call the endpoint: device tokens and admin API keys of the fleet server, checked and cached.

A request carries ``Authorization: Bearer <secret>``: an admin API key (``efk_``, any role may run
inference; ``operator`` and up may load and unload models) or a device access token (``efd_``, only
``accepted`` devices). A device may only call models assigned to a device of its fleet, and is
rate-limited per device. Checking a secret costs a database query, so a checked secret (with its
fleet's models and its own assigned versions) is kept for ``auth_cache_s`` seconds: revoking a
token or changing assignments takes effect within that time.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from bundles.errors import AuthError
from fleet_server.errors import ForbiddenError
from fleet_server.models import Assignment, Device
from fleet_server.principals import AdminPrincipal
from fleet_server.ratelimit import RateLimiter
from fleet_server.security import ADMIN_KEY_PREFIX, hash_secret
from fleet_server.settings import Settings

ROLE_RANK = {"viewer": 0, "operator": 1, "admin": 2}
MAX_CACHED = 50_000


@dataclass(frozen=True)
class Caller:
    """An authenticated caller: an admin key (``role``) or a device (``device_id``, its fleet's models)."""

    name: str
    role: str | None = None
    device_id: str | None = None
    fleet: str | None = None
    fleet_models: frozenset[str] = frozenset()
    assigned: tuple[tuple[str, int], ...] = ()

    @property
    def is_device(self) -> bool:
        return self.device_id is not None

    def assigned_version(self, model: str) -> int | None:
        """The version this device is assigned for ``model`` (None: not assigned, or an admin)."""
        return next((v for m, v in self.assigned if m == model), None)

    def check_model(self, model: str) -> None:
        """A device may call only the models its fleet has been assigned (a 403 otherwise)."""
        if self.is_device and model not in self.fleet_models:
            raise ForbiddenError(f"device {self.device_id} may not call model '{model}': its fleet is not assigned it")

    def check_role(self, role: str) -> None:
        if self.role is None or ROLE_RANK.get(self.role, -1) < ROLE_RANK[role]:
            raise ForbiddenError(f"{self.name} may not do this: it needs an admin API key with role {role} or higher")


class Access:
    """Authenticates bearer secrets (cached) and rate-limits devices."""

    def __init__(
        self, session_factory: sessionmaker[Session], settings: Settings, cache_s: float, device_rate_per_minute: int
    ) -> None:
        self.session_factory, self.settings, self.cache_s = session_factory, settings, cache_s
        self.limiter = RateLimiter(device_rate_per_minute)
        self._cache: dict[str, tuple[float, Caller]] = {}

    async def caller(self, authorization: str | None) -> Caller:
        """The caller behind an ``Authorization`` header (401 when missing or unknown)."""
        secret = _bearer(authorization)
        digest = hash_secret(secret, self.settings.token_pepper)
        cached = self._cache.get(digest)
        now = time.monotonic()
        if cached is not None and cached[0] > now:
            caller = cached[1]
        else:
            caller = await asyncio.to_thread(self._lookup, secret)
            if len(self._cache) >= MAX_CACHED:
                self._cache.clear()
            self._cache[digest] = (now + self.cache_s, caller)
        if caller.device_id is not None:
            self.limiter.check(f"device {caller.device_id}", "inference requests")
        return caller

    def _lookup(self, secret: str) -> Caller:
        if secret.startswith(ADMIN_KEY_PREFIX):
            from fleet_server.services.api_keys import authenticate_api_key

            admin: AdminPrincipal = authenticate_api_key(self.session_factory, self.settings, secret)
            return Caller(name=f"API key '{admin.name}'", role=admin.role)
        from fleet_server.services.devices import authenticate_device

        with self.session_factory() as session:
            device = authenticate_device(session, self.settings, secret)
            if device.status != "accepted":
                raise ForbiddenError(f"device {device.device_id} is {device.status}, not accepted")
            fleet = session.scalar(select(Device.fleet).where(Device.id == device.device_id))
            models = session.scalars(
                select(Assignment.model_name)
                .join(Device, Device.id == Assignment.device_id)
                .where(Device.fleet == fleet)
            )
            own = session.execute(
                select(Assignment.model_name, Assignment.bundle_version).where(Assignment.device_id == device.device_id)
            )
            return Caller(
                name=f"device {device.device_id}", device_id=device.device_id, fleet=fleet,
                fleet_models=frozenset(models), assigned=tuple((m, int(v)) for m, v in own),
            )  # fmt: skip


def _bearer(authorization: str | None) -> str:
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthError("missing bearer token: send 'Authorization: Bearer <device token or API key>'")
    return token.strip()
