"""The fleet server's device API over httpx: enrollment, desired state with ETag, inventory.

Every call maps failures to :mod:`bundles.errors` at this boundary: no answer is a
:class:`TransportError`, 5xx and 429 a :class:`ServerError` (both: retry with backoff, and not before
the server's ``Retry-After``: :mod:`device_agent.retry_after`), 401/403 an :class:`AuthError`, other 4xx a
:class:`ConfigError` carrying the server's ``detail`` sentence.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import httpx

from bundles.contract import DesiredState, Inventory, parse, parse_json, to_dict
from bundles.errors import AuthError, ConfigError, ServerError, TransportError
from device_agent.identity import Enrollment, public_key_hex
from device_agent.retry_after import retry_after_s
from device_agent.version import AGENT_VERSION


class FleetClient:
    """Device-side calls to one fleet server."""

    def __init__(self, server_url: str, access_token: str | None = None, timeout_s: float = 30.0,
                 transport: httpx.BaseTransport | None = None) -> None:  # fmt: skip
        self.server_url = server_url.rstrip("/")
        self.access_token = access_token
        self.http = httpx.Client(
            base_url=self.server_url, timeout=timeout_s, transport=transport,
            headers={"User-Agent": f"edgefleet-agent/{AGENT_VERSION}"},
        )  # fmt: skip

    def headers(self) -> dict[str, str]:
        return {} if self.access_token is None else {"Authorization": f"Bearer {self.access_token}"}

    def _call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self.http.request(method, path, headers=self.headers(), **kwargs)
        except httpx.HTTPError as e:
            raise TransportError(f"{method} {self.server_url}{path} failed: {e}") from e
        _raise_for_status(response, f"{method} {path}")
        return response

    def enroll(self, token: str, key: Any, inventory: Mapping[str, Any]) -> tuple[Enrollment, dict[str, Any]]:
        """Challenge, sign the nonce, enroll; returns the enrollment and the trusted TUF root."""
        nonce = self._call("POST", "/api/v1/enroll/challenge", json={}).json()["nonce"]
        body = {"token": token, "public_key": public_key_hex(key), "nonce": nonce,
                "signature": key.sign(bytes.fromhex(nonce)).hex(), "inventory": dict(inventory)}  # fmt: skip
        answer = self._call("POST", "/api/v1/enroll", json=body).json()
        tuf = answer["tuf"]
        enrollment = Enrollment(
            server_url=self.server_url, device_id=answer["device_id"], access_token=answer["access_token"],
            status=answer["status"], metadata_url=_absolute(self.server_url, tuf["metadata_url"]),
            targets_url=_absolute(self.server_url, tuf["targets_url"]),
        )  # fmt: skip
        return enrollment, tuf["root"]

    def desired_state(self, etag: str | None) -> tuple[DesiredState | None, str | None]:
        """``(state, etag)``; ``state`` is None when the server answers 304 (unchanged).

        Raises:
            ContractError: the answer is not a valid desired state (nothing of it is used).
        """
        headers = {} if etag is None else {"If-None-Match": etag}
        try:
            response = self.http.get("/api/v1/device/desired-state", headers={**self.headers(), **headers})
        except httpx.HTTPError as e:
            raise TransportError(f"GET {self.server_url}/api/v1/device/desired-state failed: {e}") from e
        if response.status_code == 304:
            return None, etag
        _raise_for_status(response, "GET desired-state")
        return parse_json(DesiredState, response.content, "desired state"), response.headers.get("ETag")

    def put_inventory(self, inventory: Inventory | Mapping[str, Any]) -> None:
        """Report the inventory (checked against the contract before it is sent)."""
        body = inventory if isinstance(inventory, Inventory) else parse(Inventory, dict(inventory), "inventory")
        self._call("PUT", "/api/v1/device/inventory", json=to_dict(body))

    def close(self) -> None:
        self.http.close()


def _absolute(server_url: str, url: str) -> str:
    return url if url.startswith(("http://", "https://")) else f"{server_url}/{url.lstrip('/')}"


def _detail(response: httpx.Response) -> str:
    try:
        return str(response.json().get("detail", response.text))
    except ValueError:
        return response.text[:200]


def _raise_for_status(response: httpx.Response, what: str) -> None:
    code = response.status_code
    if code < 400:
        return
    if code in (401, 403):
        raise AuthError(f"{what}: the server refused the device's credentials ({code}): {_detail(response)}")
    if code >= 500 or code == 429:
        raise ServerError(f"{what}: the server answered {code}: {_detail(response)}", retry_after_s(response.headers))
    raise ConfigError(f"{what}: the server answered {code}: {_detail(response)}")
