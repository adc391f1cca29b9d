"""Dashboard sessions: a signed cookie, CSRF tokens, and the admin API key behind a login.

The dashboard keeps no server-side session table. Its cookie carries a random session id, the id of
the API key that logged in (or none before login), a binding to that key's stored hash, and the time
of issue, signed with ``itsdangerous`` under a key derived from ``settings.token_pepper`` (so changing
the pepper, which already invalidates every API key, also ends every dashboard session).

Flow:

1. Any page first gives the browser an anonymous session (a fresh random id, no key).
2. The login form carries a CSRF token derived from that id (HMAC); ``POST /login`` checks it, checks
   the API key with the same function the admin API uses, and issues a **new** session id bound to the
   key. A session id planted before login (session fixation) therefore never becomes authenticated.
3. Every request re-reads the key row: a revoked key or a changed role takes effect on the next click.
4. Every mutating form carries the session's CSRF token; the cookie is ``HttpOnly`` and
   ``SameSite=Strict``, ``Secure`` when the server's public URL is https, and valid for at most
   :data:`SESSION_MAX_AGE_S` after login.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass

from itsdangerous import BadSignature, URLSafeTimedSerializer
from sqlalchemy.orm import Session, sessionmaker

from fleet_server.models import ApiKey
from fleet_server.principals import AdminPrincipal

COOKIE_NAME = "edgefleet_session"
SESSION_MAX_AGE_S = 8 * 3600
"""A login lasts at most this long (the cookie's max-age and the signature's age limit)."""
_SALT = "edgefleet.dashboard.session.v1"
_BINDING_CHARS = 32


@dataclass(frozen=True)
class WebSession:
    """What the cookie says: a random id, the logged-in key (if any) and its binding, when issued."""

    sid: str
    key_id: int | None = None
    key_binding: str = ""
    issued_at: float = 0.0

    @property
    def logged_in(self) -> bool:
        """Whether a key logged in with this session."""
        return self.key_id is not None


def anonymous_session() -> WebSession:
    """A fresh session with no key (what a visitor gets before logging in)."""
    return WebSession(sid=secrets.token_urlsafe(32), issued_at=time.time())


class SessionCodec:
    """Signs and checks session cookies and CSRF tokens with keys derived from the server's pepper."""

    def __init__(self, pepper: str) -> None:
        root = hmac.new(pepper.encode(), b"edgefleet dashboard", hashlib.sha256).digest()
        self._serializer = URLSafeTimedSerializer(root, salt=_SALT)
        self._csrf_key = hmac.new(root, b"csrf", hashlib.sha256).digest()
        self._binding_key = hmac.new(root, b"key binding", hashlib.sha256).digest()

    def dumps(self, web: WebSession) -> str:
        """The cookie value for ``web``."""
        return self._serializer.dumps([web.sid, web.key_id, web.key_binding, web.issued_at])

    def loads(self, cookie: str | None) -> WebSession | None:
        """The session in ``cookie``; None when it is absent, forged, malformed or too old."""
        if not cookie:
            return None
        try:
            sid, key_id, binding, issued_at = self._serializer.loads(cookie, max_age=SESSION_MAX_AGE_S)
        except (BadSignature, ValueError, TypeError):
            return None
        if not isinstance(sid, str) or not (key_id is None or isinstance(key_id, int)):
            return None
        return WebSession(sid, key_id, str(binding), float(issued_at))

    def csrf_token(self, web: WebSession) -> str:
        """The CSRF token of a session (forms send it back; it changes with the session id)."""
        return hmac.new(self._csrf_key, web.sid.encode(), hashlib.sha256).hexdigest()

    def csrf_matches(self, web: WebSession, token: str) -> bool:
        """Whether ``token`` is this session's CSRF token (constant-time)."""
        return hmac.compare_digest(self.csrf_token(web), token)

    def binding(self, key_hash: str) -> str:
        """A value tying a session to one key row (a reused id with another secret does not match)."""
        return hmac.new(self._binding_key, key_hash.encode(), hashlib.sha256).hexdigest()[:_BINDING_CHARS]

    def logged_in_session(self, key: ApiKey) -> WebSession:
        """A new session (new id) for ``key`` after a successful login."""
        return WebSession(secrets.token_urlsafe(32), key.id, self.binding(key.key_hash), time.time())

    def principal(self, factory: sessionmaker[Session], web: WebSession | None) -> AdminPrincipal | None:
        """The key behind a session, read now: None if not logged in, or the key is revoked or replaced."""
        if web is None or web.key_id is None:
            return None
        with factory() as session:
            key = session.get(ApiKey, web.key_id)
            if key is None or key.revoked_at is not None:
                return None
            if not hmac.compare_digest(self.binding(key.key_hash), web.key_binding):
                return None
            return AdminPrincipal(key_id=key.id, name=key.name, role=key.role)
