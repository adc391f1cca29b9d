"""Error context: every converter error names the model and the variant it is about, once."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from bundles.errors import ConfigError, ConversionError


@contextmanager
def about(model_ref: str, variant: str) -> Iterator[None]:
    """Prefix a ConversionError/ConfigError raised inside with ``model <ref>, variant <id>:`` (if not already)."""
    try:
        yield
    except (ConversionError, ConfigError) as e:
        if str(e).startswith("model "):
            raise
        raise type(e)(f"model {model_ref}, variant {variant}: {e}") from e
