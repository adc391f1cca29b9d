"""FastAPI dependencies shared by every router (core, telemetry, rollouts).

- ``SessionDep``: a SQLAlchemy session, committed when the handler returns, rolled back on error. Routers
  use :class:`SessionRoute`, so that a synchronous handler's session is committed in the handler's own
  worker thread, before the response is validated (see the class).
- ``SettingsDep``: the app's :class:`~fleet_server.settings.Settings`.
- ``ViewerDep`` / ``OperatorDep`` / ``AdminDep``: the calling admin API key (an :class:`AdminPrincipal`)
  with at least that role; ``viewer`` < ``operator`` < ``admin``. A missing or revoked key is a 401,
  a weaker role a 403.
- ``DeviceDep``: the calling device (a :class:`DevicePrincipal`), from its bearer access token; only
  ``accepted`` devices pass (``pending`` devices may poll desired state via ``AnyDeviceDep``).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterator
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.routing import APIRoute
from sqlalchemy.orm import Session, sessionmaker

from bundles.errors import AuthError
from fleet_server.db import session_scope
from fleet_server.errors import ForbiddenError
from fleet_server.principals import AdminPrincipal, DevicePrincipal
from fleet_server.settings import Settings

ROLE_RANK = {"viewer": 0, "operator": 1, "admin": 2}
__all__ = [
    "AdminPrincipal",
    "DevicePrincipal",
    "AdminDep",
    "AnyDeviceDep",
    "DeviceDep",
    "OperatorDep",
    "SessionDep",
    "SessionRoute",
    "SettingsDep",
    "ViewerDep",
    "require_role",
]


def get_settings(request: Request) -> Settings:
    """The settings the app was created with."""
    settings: Settings = request.app.state.settings
    return settings


def get_session(request: Request) -> Iterator[Session]:
    """One session per request, committed after the handler (rolled back if it raises)."""
    factory: sessionmaker[Session] = request.app.state.session_factory
    with session_scope(factory) as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session, scope="function")]  # commit before the response is sent


class SessionRoute(APIRoute):
    """A route whose synchronous handler commits its ``SessionDep`` session before it returns, in its own thread.

    FastAPI validates a synchronous handler's response on another thread of the shared pool (40
    threads) and only then runs the dependency's exit (the commit). On SQLite a transaction that has
    written holds the database's write lock until that commit, so when every pool thread was taken
    by requests waiting for that lock (a burst of enrollments or uploads), the holder could not get a
    thread to finish on, and nothing moved until the waiters gave up at the busy timeout (10 s, then
    503s, then the same again). Committed here, a write transaction never waits for a thread while
    it holds the lock. The exit's commit then has nothing left to do; a handler that raises is still
    rolled back there.
    """

    def __init__(self, path: str, endpoint: Callable[..., Any], **kwargs: Any) -> None:
        super().__init__(path, commits_before_returning(endpoint), **kwargs)


def commits_before_returning(endpoint: Callable[..., Any]) -> Callable[..., Any]:
    """``endpoint`` (if synchronous) wrapped to commit every session among its arguments when it returns.

    ``functools.wraps`` keeps the signature FastAPI reads the parameters and dependencies from."""
    if inspect.iscoroutinefunction(endpoint) or getattr(endpoint, "commits_before_returning", False):
        return endpoint

    @functools.wraps(endpoint)
    def committing(*args: Any, **kwargs: Any) -> Any:
        result = endpoint(*args, **kwargs)
        for value in kwargs.values():
            if isinstance(value, Session):
                value.commit()
        return result

    committing.commits_before_returning = True  # type: ignore[attr-defined]
    return committing


SettingsDep = Annotated[Settings, Depends(get_settings)]


def bearer_token(request: Request) -> str:
    """The bearer token of the request; a 401 when there is none."""
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthError("missing bearer token: send 'Authorization: Bearer <token>'")
    return token.strip()


def _authenticate_admin(request: Request) -> AdminPrincipal:
    from fleet_server.services.api_keys import authenticate_api_key

    return authenticate_api_key(request.app.state.session_factory, get_settings(request), bearer_token(request))


def require_role(role: str) -> Callable[[Request], AdminPrincipal]:
    """A dependency that admits admin keys with at least ``role``."""

    def dependency(request: Request) -> AdminPrincipal:
        principal = _authenticate_admin(request)
        if ROLE_RANK[principal.role] < ROLE_RANK[role]:
            raise ForbiddenError(f"API key '{principal.name}' has role {principal.role}; this needs {role}")
        return principal

    return dependency


ViewerDep = Annotated[AdminPrincipal, Depends(require_role("viewer"))]
OperatorDep = Annotated[AdminPrincipal, Depends(require_role("operator"))]
AdminDep = Annotated[AdminPrincipal, Depends(require_role("admin"))]


def any_device(request: Request) -> DevicePrincipal:
    """The calling device whatever its status (rejected and decommissioned devices are refused)."""
    from fleet_server.services.devices import authenticate_device

    token = bearer_token(request)
    with request.app.state.session_factory() as session:
        return authenticate_device(session, get_settings(request), token)


def accepted_device(request: Request) -> DevicePrincipal:
    """The calling device, which must be accepted (a pending device gets a 403)."""
    principal = any_device(request)
    if principal.status != "accepted":
        raise ForbiddenError(f"device {principal.device_id} is {principal.status}, not accepted")
    return principal


AnyDeviceDep = Annotated[DevicePrincipal, Depends(any_device)]
DeviceDep = Annotated[DevicePrincipal, Depends(accepted_device)]
