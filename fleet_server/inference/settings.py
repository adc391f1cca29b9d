"""The inference endpoint's settings: ``EDGEFLEET_INFERENCE_*``, beside the fleet server's own.

They are read from the same places as :class:`fleet_server.settings.Settings` (the environment, then
``<data-dir>/server.env``), so one file configures both processes. See ``docs/inference.md``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from fleet_server.settings import Settings, load_settings


class InferenceSettings(BaseSettings):
    """How ``edgefleet-server inference`` serves (every field documented in docs/inference.md)."""

    model_config = SettingsConfigDict(env_prefix="EDGEFLEET_INFERENCE_", env_file=None, extra="ignore")

    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = 8090
    workers: Annotated[int, Field(ge=1, le=64)] = 1
    models: list[str] = []
    """``name@version`` (or ``name`` for the newest) to load at start: ready only once they all are."""
    loading: Literal["lazy", "eager"] = "lazy"
    memory_budget_mb: Annotated[float, Field(gt=0)] = 1024.0
    memory_per_byte: Annotated[float, Field(ge=1.0)] = 2.0
    """A loaded model is counted as its variant's file bytes times this (runtime buffers, arenas)."""
    trusted_root: Path | None = None
    """The TUF root this endpoint trusts; default: the repository's first root (``1.root.json``)."""
    max_batch_size: Annotated[int, Field(ge=1, le=4096)] = 32
    max_queue_delay_us: Annotated[int, Field(ge=0, le=1_000_000)] = 2000
    max_queue: Annotated[int, Field(ge=1, le=1_000_000)] = 256
    batching: bool = True
    threads: Annotated[int, Field(ge=1, le=64)] = 2
    """Threads that run models (batches and unbatched requests) in each worker process."""
    max_body_bytes: Annotated[int, Field(ge=1024)] = 64 * 2**20
    device_rate_per_minute: Annotated[int, Field(ge=1)] = 6000
    auth_cache_s: Annotated[float, Field(ge=0, le=300)] = 10.0
    """How long a checked token (and its fleet's models) is trusted before the database is asked again."""
    cache_dir: Path | None = None
    """Where verified bundles are unpacked; default ``<data-dir>/inference``."""


class Configured:
    """The fleet server's settings and the endpoint's own, as one object the app and the CLI pass around."""

    def __init__(self, server: Settings, inference: InferenceSettings) -> None:
        self.server, self.inference = server, inference

    @property
    def cache_dir(self) -> Path:
        return self.inference.cache_dir or self.server.data_dir / "inference"

    @property
    def trusted_root(self) -> Path:
        return self.inference.trusted_root or self.server.tuf_dir / "metadata" / "1.root.json"


def load_inference_settings(data_dir: Path | None = None, **overrides: Any) -> Configured:
    """Both settings from the environment and ``<data-dir>/server.env`` (environment wins)."""
    server = load_settings(data_dir)
    env_file = server.env_file
    values = {k: v for k, v in overrides.items() if v is not None}
    inference = InferenceSettings(_env_file=env_file if env_file.is_file() else None, **values)  # type: ignore[call-arg]
    return Configured(server, inference)
