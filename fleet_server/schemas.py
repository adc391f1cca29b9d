"""Request and response bodies of the HTTP API (pydantic v2).

Only the shape is checked here (types, lengths, ranges); domain rules live in the services.
Every string has a length bound so that no field can be used to push megabytes through validation.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

Hex = str
MAX_INT32 = 2**31 - 1  # every integer column is a 32-bit INTEGER on PostgreSQL
ENROLL_TOKEN_LIFETIME_S = (60, 366 * 86_400)  # (shortest, longest): the API and the CLI accept the same
DbInt = Annotated[int, Field(ge=0, le=MAX_INT32)]
ShortText = Field(min_length=1, max_length=200)


class Strict(BaseModel):
    """Refuse unknown fields so a typo is a clear 422 rather than a silent no-op."""

    model_config = ConfigDict(extra="forbid")


class ChallengeOut(BaseModel):
    nonce: str
    expires_in_s: int


class EnrollIn(BaseModel):
    token: str = Field(min_length=1, max_length=200)
    public_key: Hex = Field(min_length=64, max_length=64, pattern="^[0-9a-fA-F]+$")
    nonce: Hex = Field(min_length=2, max_length=128, pattern="^[0-9a-fA-F]+$")
    signature: Hex = Field(min_length=128, max_length=128, pattern="^[0-9a-fA-F]+$")
    inventory: dict[str, Any] = Field(default_factory=dict)


class TufInfo(BaseModel):
    root: dict[str, Any] | None
    metadata_url: str
    targets_url: str


class EnrollOut(BaseModel):
    device_id: str
    status: Literal["pending", "accepted"]
    access_token: str
    tuf: TufInfo


class ApiKeyIn(Strict):
    name: str = Field(min_length=1, max_length=100)
    role: Literal["admin", "operator", "viewer"]


class ApiKeyOut(BaseModel):
    id: int
    name: str
    role: str
    prefix: str
    created_at: str
    created_by: str
    revoked_at: str | None
    last_used_at: str | None


class ApiKeyCreated(ApiKeyOut):
    secret: str


class EnrollTokenIn(Strict):
    fleet: str = Field(min_length=1, max_length=64, pattern="^[a-z0-9][a-z0-9_.-]*$")
    expires_in_s: int = Field(default=7 * 86_400, ge=ENROLL_TOKEN_LIFETIME_S[0], le=ENROLL_TOKEN_LIFETIME_S[1])
    max_uses: int | None = Field(default=None, ge=1, le=MAX_INT32)


class EnrollTokenOut(BaseModel):
    id: int
    fleet: str
    prefix: str
    expires_at: str
    max_uses: int | None
    uses: int
    revoked_at: str | None
    token: str | None = None


class DeviceOut(BaseModel):
    id: str
    fleet: str
    status: str
    public_key: str
    hw_class: str | None
    arch: str | None
    os: str | None
    python: str | None
    agent_version: str | None
    memory_mb: int | None
    disk_free_mb: int | None
    capabilities: dict[str, Any]
    installed: list[Any]
    enrolled_at: str | None
    last_seen_at: str | None
    tags: list[str] = Field(default_factory=list)
    groups: list[str] = Field(default_factory=list)


class DeviceList(BaseModel):
    data: list[DeviceOut]
    count: int


class TagsIn(Strict):
    add: list[str] = Field(default_factory=list, max_length=50)
    remove: list[str] = Field(default_factory=list, max_length=50)


class GroupIn(Strict):
    name: str = Field(min_length=1, max_length=100, pattern="^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    description: str = Field(default="", max_length=1000)
    poll_interval_s: int | None = Field(default=None, ge=5, le=86_400)


class GroupPatch(Strict):
    description: str | None = Field(default=None, max_length=1000)
    poll_interval_s: int | None = Field(default=None, ge=5, le=86_400)
    clear_poll_interval: bool = False


class GroupOut(BaseModel):
    id: int
    name: str
    description: str
    poll_interval_s: int | None
    members: int


class MembersIn(Strict):
    device_ids: list[str] = Field(min_length=1, max_length=10_000)


class FilterIn(Strict):
    name: str = Field(min_length=1, max_length=100, pattern="^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    expression: str = Field(min_length=1, max_length=2000)


class FilterOut(BaseModel):
    id: int
    name: str
    expression: str


class AssignmentIn(Strict):
    device_id: str = Field(min_length=1, max_length=40)
    model_name: str = Field(min_length=1, max_length=100)
    bundle_version: int = Field(ge=1, le=MAX_INT32)
    variant: str | None = Field(default=None, max_length=100)
    pinned: bool = True


class AssignmentOut(BaseModel):
    device_id: str
    model_name: str
    bundle_version: int
    variant: str | None
    rollout_id: int | None
    shadow_version: int | None
    pinned: bool
    start_after: str | None
    updated_at: str


class BundleOut(BaseModel):
    name: str
    version: int
    manifest_target: str
    variants: list[Any]
    deprecated: bool
    size_bytes: int
    created_at: str


class BundleDetail(BundleOut):
    manifest: dict[str, Any]


class PublicationOut(BaseModel):
    targets: list[str]
    bundles: list[dict[str, Any]]


class TufStateOut(BaseModel):
    root: dict[str, Any] | None
    targets: dict[str, Any] | None
    online_keys: dict[str, Any]


class RootInstalled(BaseModel):
    version: int


class TelemetryOut(BaseModel):
    accepted: dict[str, int]
    duplicate: bool


class AuditOut(BaseModel):
    id: int
    at: str
    actor: str
    action: str
    target_type: str
    target_id: str
    before: dict[str, Any] | None
    after: dict[str, Any] | None
