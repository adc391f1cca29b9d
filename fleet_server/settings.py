"""Server settings, read from the environment (prefix ``EDGEFLEET_``) or passed in by tests.

Outside ``mode = "dev"`` the settings refuse insecure defaults: a public URL that is not https, and a
token pepper that is the default or shorter than 16 characters (:meth:`Settings.insecure_settings`).
``dev`` mode only warns, so a laptop demo works with no configuration.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

log = logging.getLogger("fleet_server.settings")
INSECURE_PEPPER = "changethis"
ENV_FILE_NAME = "server.env"


class Settings(BaseSettings):
    """Everything the server needs to know; see ``docs/server.md`` for each field."""

    model_config = SettingsConfigDict(env_prefix="EDGEFLEET_", env_file=None, extra="ignore")

    mode: Literal["dev", "production"] = "production"
    data_dir: Path = Path("./edgefleet-data")
    database_url: str | None = None
    public_url: str = "http://127.0.0.1:8080"
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = 8080
    token_pepper: str = INSECURE_PEPPER
    log_level: str = "info"
    json_logs: bool = True

    require_approval: bool = False
    enroll_rate_per_minute: Annotated[int, Field(ge=1)] = 60
    login_failures_per_minute: Annotated[int, Field(ge=1)] = 10
    nonce_ttl_s: Annotated[int, Field(ge=10)] = 300

    poll_db_connections: Annotated[int, Field(ge=1, le=100)] = 4
    sqlite_busy_timeout_ms: Annotated[int, Field(ge=0, le=600_000)] = 10_000
    poll_interval_s: Annotated[int, Field(ge=5)] = 300
    jitter_s: Annotated[int, Field(ge=0)] = 30
    fallback_url: str | None = None
    """The inference endpoint (OIP v2 base URL) announced to devices; None: ``<public_url>/v2``."""
    telemetry_window_s: Annotated[int, Field(ge=1)] = 60
    telemetry_sample_rate: Annotated[float, Field(ge=0.0, le=1.0)] = 0.01
    telemetry_reservoir_size: Annotated[int, Field(ge=0)] = 20
    telemetry_upload_interval_s: Annotated[int, Field(ge=1)] = 60

    max_publication_bytes: Annotated[int, Field(ge=1024)] = 2 * 1024**3
    max_telemetry_bytes: Annotated[int, Field(ge=1024)] = 4 * 1024**2
    max_telemetry_items: Annotated[int, Field(ge=1)] = 20_000
    max_json_bytes: Annotated[int, Field(ge=1024)] = 1024**2
    max_unauthenticated_bytes: Annotated[int, Field(ge=1024)] = 16 * 1024

    timestamp_expiry_s: Annotated[int, Field(ge=60)] = 86_400
    snapshot_expiry_s: Annotated[int, Field(ge=60)] = 7 * 86_400
    tuf_refresh_interval_s: Annotated[int, Field(ge=1)] = 3600
    background_tasks: bool = True
    leader_check_s: Annotated[float, Field(gt=0, le=3600)] = 5.0
    rollout_tick_s: Annotated[float, Field(gt=0, le=3600)] = 10.0

    @model_validator(mode="after")
    def _refuse_insecure_defaults(self) -> Settings:
        """Refuse (production) or warn about (dev) settings that would expose a fleet."""
        problems = self.insecure_settings()
        if problems and self.mode == "dev":
            for problem in problems:
                log.warning("dev mode allows an insecure setting: %s", problem)
        elif problems:
            raise ValueError("refusing insecure settings outside dev mode: " + "; ".join(problems))
        return self

    def insecure_settings(self) -> list[str]:
        """Each insecure choice as one readable sentence."""
        problems = []
        if self.token_pepper == INSECURE_PEPPER or len(self.token_pepper) < 16:
            problems.append("EDGEFLEET_TOKEN_PEPPER is the default or shorter than 16 characters")
        if not self.public_url.startswith("https://"):
            problems.append(f"EDGEFLEET_PUBLIC_URL {self.public_url!r} is not https://")
        return problems

    @property
    def inference_url(self) -> str:
        """The inference endpoint every desired state announces: ``fallback_url``, else ``<public_url>/v2``.

        Devices send their own access token to this URL (and only to the one the server names), so it is
        the fleet's endpoint (``edgefleet-server inference`` behind the same host, or one set here).
        """
        return self.fallback_url or self.public_url.rstrip("/") + "/v2"

    @property
    def env_file(self) -> Path:
        """The settings file ``edgefleet-server init`` writes into the data directory."""
        return self.data_dir / ENV_FILE_NAME

    @property
    def resolved_database_url(self) -> str:
        """The configured database URL, or the embedded SQLite file in the data directory."""
        return self.database_url or f"sqlite:///{(self.data_dir / 'fleet.db').resolve()}"

    @property
    def tuf_dir(self) -> Path:
        """The TUF repository directory (metadata/ and targets/)."""
        return self.data_dir / "tuf"

    @property
    def keys_dir(self) -> Path:
        """Where the online snapshot and timestamp keys live (mode 0600)."""
        return self.data_dir / "keys"

    @property
    def uploads_dir(self) -> Path:
        """Scratch space for publications being received (same filesystem as the repository)."""
        return self.data_dir / "uploads"


def load_settings(data_dir: Path | None = None, **overrides: Any) -> Settings:
    """Settings from the environment plus ``<data_dir>/server.env`` (written by ``init``); env wins.

    ``data_dir`` defaults to ``EDGEFLEET_DATA_DIR`` or ``./edgefleet-data``.
    """
    directory = data_dir or Path(os.environ.get("EDGEFLEET_DATA_DIR", "./edgefleet-data"))
    env_file = directory / ENV_FILE_NAME
    values = {"data_dir": directory, **{k: v for k, v in overrides.items() if v is not None}}
    return Settings(_env_file=env_file if env_file.is_file() else None, **values)  # type: ignore[call-arg]
