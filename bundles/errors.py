"""The one error tree of edgefleet.

Every error the project raises on purpose derives from :class:`EdgeFleetError`. The families
say who is at fault and whether a retry can help, so callers decide by catching a family rather
than by parsing messages:

- :class:`BundleError`: the bytes are wrong (bad manifest, hash mismatch, unsafe archive, untrusted
  metadata). Never retry the same bytes.
- :class:`TransportError`: the network or a peer failed. Retry with backoff.
- :class:`InstallError`: installing a bundle on a device failed; the device keeps its old model.
- :class:`InferenceError`: a prediction could not be made.
- :class:`ConversionError`: a model could not be converted or failed its gates.
- :class:`ConfigError`: a setting, a CLI option or a request is invalid: the user must fix it.

Third-party exceptions are wrapped at the boundary with ``raise ... from e`` so that the
original cause stays in the traceback. The full tree is documented in ``docs/exceptions.md``.
"""

from __future__ import annotations


class EdgeFleetError(Exception):
    """Root of every error edgefleet raises on purpose."""


# --- configuration and input -------------------------------------------------------------------
class ConfigError(EdgeFleetError):
    """A setting, option or request is invalid; the user must change it."""


class ContractError(ConfigError, ValueError):
    """A message or state file does not fit the typed contract (``bundles.contract``); names the field.

    Also a ``ValueError`` so that pydantic, which builds the contract's dataclasses on the server,
    reports it as a validation error (422) like its own checks.
    """


# --- bundles: the bytes are wrong, never retry the same bytes -----------------------------------
class BundleError(EdgeFleetError):
    """The bundle or its metadata is invalid; retrying the same bytes cannot help."""


class ManifestError(BundleError):
    """A manifest is malformed or violates the bundle format."""


class IntegrityError(BundleError):
    """A file's size or sha256 does not match what the manifest or TUF metadata says."""


class ArchiveError(BundleError):
    """An archive is unsafe (path traversal, escaping link, oversize) or unreadable."""


class NoCompatibleVariantError(BundleError):
    """No variant of a bundle can run on a device; ``reasons`` says why per variant."""

    def __init__(self, message: str, reasons: dict[str, list[str]]) -> None:
        super().__init__(message)
        self.reasons = reasons


class TrustError(BundleError):
    """TUF verification failed (signature, expiry, rollback, mix-and-match, hash)."""


class ExpiredMetadataError(TrustError):
    """A TUF role's metadata has expired (freeze attack or a stalled server)."""


class RollbackAttackError(TrustError):
    """TUF metadata has a lower version than one already trusted."""


class BadSignatureError(TrustError):
    """TUF metadata is not signed by a threshold of the role's keys."""


class TargetMismatchError(TrustError):
    """A downloaded target's length or hash differs from its signed target info."""


class UnknownTargetError(TrustError):
    """The signed targets metadata does not list the requested target."""


class MixAndMatchError(TrustError):
    """A metadata file differs from the length or hash its parent role lists (old and new metadata mixed)."""


class VersionConflictError(TrustError):
    """New signed metadata is not exactly one version after the current one (stale or replayed publication)."""


class TargetRewriteError(VersionConflictError):
    """A publication changes the bytes behind an already published target path.

    Published bundle versions are immutable: devices and rollback rely on ``name@version`` always
    meaning the same bytes. Publish a new version instead.
    """


class BelowFloorError(TrustError):
    """The release key set a minimum version for the model (``custom.edgefleet.min_version``) and the
    version a device was directed to is below it: no director, honest or not, can push a device there."""


class UntrustedRecordError(TrustError):
    """The server's root or targets disagree with the release workstation's pinned root and ledger.

    The workstation signs nothing until the difference is explained: the server may be compromised.
    """


class KeyFileError(EdgeFleetError):
    """A key file is missing, unreadable or has unsafe permissions."""


# --- transport: retry with backoff -----------------------------------------------------------
class TransportError(EdgeFleetError):
    """The network or a peer failed; a retry with backoff may succeed."""


class ServerError(TransportError):
    """A peer answered with an error status that a retry may fix (5xx, 429).

    ``retry_after_s`` is the wait the peer asked for (``Retry-After``), when it said: retrying sooner
    only adds load where the peer has just said it has none to spare (a fleet server whose database
    is busy answers 503 with ``Retry-After``).
    """

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class AuthError(EdgeFleetError):
    """Credentials are missing, invalid or revoked; retrying will not help until they change."""


# --- device: install and inference ----------------------------------------------------------
class InstallError(EdgeFleetError):
    """Installing a bundle failed; the previous model keeps serving."""


class SelfTestError(InstallError):
    """A bundle's golden inputs did not reproduce their expected outputs within tolerance."""

    report: object | None = None
    """The :class:`bundles.predictor.SelfTestReport` with every number, when the Predictor raised it."""


class InferenceError(EdgeFleetError):
    """A prediction could not be made."""


class ModelNotReadyError(InferenceError):
    """No model is loaded (first boot, or mid-install with no fallback)."""


class BusyError(InferenceError):
    """The inference queue is full; retry later."""


class InputError(InferenceError):
    """Inputs do not match the model's declared schema."""


class GenerationError(InputError):
    """A request the OpenAI-compatible routes refuse (400), with the OpenAI error ``param`` it concerns."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class RequestTooLargeError(InputError):
    """A request body, once inflated, or a tensor is over the limit the server or the model sets (413)."""


class UnsupportedEncodingError(InputError):
    """The request's ``Content-Encoding`` is not one the server inflates (415)."""


class DeadlineExceededError(InferenceError):
    """The request's own deadline passed before it could be answered (504); it was not run."""


class RuntimeUnavailableError(InferenceError):
    """The runtime a variant needs is not installed or cannot run on this host."""


# --- converter ---------------------------------------------------------------------------------
class ConversionError(EdgeFleetError):
    """A model could not be registered, converted, validated or published."""


class GateFailedError(ConversionError):
    """A converted variant failed its validation gates."""


__all__ = [
    "ArchiveError",
    "AuthError",
    "BadSignatureError",
    "BelowFloorError",
    "BundleError",
    "BusyError",
    "ConfigError",
    "ContractError",
    "ConversionError",
    "DeadlineExceededError",
    "EdgeFleetError",
    "ExpiredMetadataError",
    "GateFailedError",
    "GenerationError",
    "InferenceError",
    "InputError",
    "InstallError",
    "IntegrityError",
    "KeyFileError",
    "ManifestError",
    "MixAndMatchError",
    "ModelNotReadyError",
    "NoCompatibleVariantError",
    "RequestTooLargeError",
    "RollbackAttackError",
    "RuntimeUnavailableError",
    "SelfTestError",
    "ServerError",
    "TargetMismatchError",
    "TargetRewriteError",
    "TransportError",
    "TrustError",
    "UnknownTargetError",
    "UnsupportedEncodingError",
    "UntrustedRecordError",
    "VersionConflictError",
]
