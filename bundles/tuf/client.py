"""The device side of TUF: ``tuf.ngclient`` over httpx, with resumable downloads and our error tree.

Flow: :meth:`TufClient.refresh` runs the TUF client workflow (root rotations one version at a
time, then timestamp, snapshot, targets; every signature, version, expiry and hash checked by
ngclient). :meth:`TufClient.download` looks a target up in the verified targets metadata, and
downloads its hash-prefixed file unless a verified copy is already cached.

:class:`HttpxFetcher` is the network layer ngclient calls. It adds what a device on a bad link
needs: timeouts, bearer/extra headers, and resumption. When the connection drops mid-file it asks
for the rest with ``Range: bytes=N-`` and appends; for target files the received bytes are also
kept in ``<targets_dir>/.partial/`` so a download cut by a reboot continues where it stopped.
Resuming is safe because ngclient checks the whole file's length and sha256 afterwards, and target
URLs are content-addressed (the sha256 is in the file name), so bytes from two requests belong to
the same file.

Every ``tuf`` or httpx exception is mapped to :mod:`bundles.errors` at this boundary:
``ExpiredMetadataError``, ``RollbackAttackError``, ``BadSignatureError``, ``MixAndMatchError``
(metadata that differs from the hash its parent lists), ``TargetMismatchError``,
``UnknownTargetError``, and ``TransportError``/``ServerError``/``AuthError`` for the network.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import re
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import TracebackType

import httpx
from tuf.api import exceptions as tuf_errors
from tuf.api.metadata import TargetFile
from tuf.ngclient import Updater, UpdaterConfig
from tuf.ngclient.fetcher import FetcherInterface

from bundles.errors import (
    AuthError,
    BadSignatureError,
    ConfigError,
    ExpiredMetadataError,
    MixAndMatchError,
    RollbackAttackError,
    ServerError,
    TargetMismatchError,
    TransportError,
    TrustError,
    UnknownTargetError,
)

logger = logging.getLogger(__name__)

_CHUNK_BYTES = 64 * 1024
_CONTENT_ADDRESSED = re.compile(r"/[0-9a-f]{64}\.[^/]+$")


class HttpxFetcher(FetcherInterface):
    """A ``FetcherInterface`` on httpx: headers, timeouts, and ``Range`` resumption of cut downloads."""

    def __init__(
        self,
        http: httpx.Client,
        *,
        headers: Mapping[str, str] | None = None,
        max_resumes: int = 5,
        partial_dir: Path | None = None,
        partial_url_prefix: str | None = None,
        stall_window_s: float = 60.0,
        min_bytes_per_window: int = 1024,
    ) -> None:
        self.http = http
        self.stall_window_s = stall_window_s
        self.min_bytes_per_window = min_bytes_per_window
        self.headers: dict[str, str] = dict(headers or {})
        self.max_resumes = max_resumes
        self.partial_dir = partial_dir
        self.partial_url_prefix = partial_url_prefix
        self.bytes_received = 0
        self.resumes = 0

    def _fetch(self, url: str) -> Iterator[bytes]:
        """Open ``url`` now (so HTTP errors surface as ``DownloadHTTPError``) and stream it lazily."""
        partial = self._partial_path(url)
        offset = partial.stat().st_size if partial is not None and partial.exists() else 0
        response, skip = self._open(url, offset, replaying=False)
        if offset and response.status_code != 206:
            _drop(partial)
            offset = 0
        return self._stream(url, response, skip, offset, partial)

    def _stream(
        self, url: str, response: httpx.Response, skip: int, replay: int, partial: Path | None
    ) -> Iterator[bytes]:
        completed = abandoned = False
        sink = open(partial, "ab") if partial is not None else None  # noqa: SIM115
        try:
            if replay and partial is not None:
                yield from _read_chunks(partial, replay)
            offset, resumes = replay, 0
            while True:
                try:
                    # iter_bytes() without a size yields bytes as they arrive: none are lost in a buffer on a cut
                    for chunk in self._guarded(url, _skipped(response.iter_bytes(), skip)):
                        offset += len(chunk)
                        self.bytes_received += len(chunk)
                        if sink is not None:
                            sink.write(chunk)
                        yield chunk
                    completed = True
                    return
                except httpx.TransportError as e:
                    response.close()
                    resumes += 1
                    if resumes > self.max_resumes:
                        raise tuf_errors.DownloadError(f"download of {url} failed after {resumes - 1} resumes") from e
                    logger.info("connection cut after %d bytes of %s; resuming with Range", offset, url)
                    self.resumes += 1
                    response, skip = self._open(url, offset, replaying=True)
        except GeneratorExit:
            abandoned = True  # the consumer stopped reading: too long, so these bytes are not worth keeping
            raise
        finally:
            response.close()
            if sink is not None:
                sink.close()
            if completed or abandoned:
                _drop(partial)

    def _guarded(self, url: str, chunks: Iterator[bytes]) -> Iterator[bytes]:
        """Abort a trickle (slow-retrieval attack): each window must bring ``min_bytes_per_window`` bytes.

        The read timeout alone does not catch a server that sends one byte just before every timeout.
        """
        window_start, window_bytes = time.monotonic(), 0
        for chunk in chunks:
            window_bytes += len(chunk)
            elapsed_s = time.monotonic() - window_start
            if elapsed_s >= self.stall_window_s:
                if window_bytes < self.min_bytes_per_window:
                    raise tuf_errors.SlowRetrievalError(
                        f"{url} sent {window_bytes} bytes in {elapsed_s:.1f} s, below {self.min_bytes_per_window}"
                    )
                window_start, window_bytes = time.monotonic(), 0
            yield chunk

    def _open(self, url: str, offset: int, *, replaying: bool) -> tuple[httpx.Response, int]:
        """Send the GET (with ``Range`` when ``offset``); return the response and bytes to skip."""
        # identity: byte offsets for Range must be offsets in the file, not in a compressed stream
        headers = {**self.headers, "Accept-Encoding": "identity"}
        if offset:
            headers["Range"] = f"bytes={offset}-"
        try:
            response = self.http.send(self.http.build_request("GET", url, headers=headers), stream=True)
        except httpx.HTTPError as e:
            raise tuf_errors.DownloadError(f"cannot fetch {url}: {e}") from e
        if response.status_code == 416 and offset and not replaying:
            response.close()
            return self._open(url, 0, replaying=False)
        if response.status_code == 206 and offset:
            _check_content_range(url, response, offset)
            return response, 0
        if response.status_code == 200:
            return response, offset if replaying else 0
        response.close()
        raise tuf_errors.DownloadHTTPError(f"{url} answered HTTP {response.status_code}", response.status_code)

    def _partial_path(self, url: str) -> Path | None:
        """Where received bytes of ``url`` are kept across restarts: only for content-addressed target URLs."""
        if self.partial_dir is None or not self.partial_url_prefix or not url.startswith(self.partial_url_prefix):
            return None
        if not _CONTENT_ADDRESSED.search(url):
            return None  # a mutable file (timestamp.json) must never be resumed from an older copy
        self.partial_dir.mkdir(parents=True, exist_ok=True)
        return self.partial_dir / (hashlib.sha256(url.encode()).hexdigest()[:40] + ".part")


def _check_content_range(url: str, response: httpx.Response, offset: int) -> None:
    content_range = response.headers.get("Content-Range", "")
    if not content_range.startswith(f"bytes {offset}-"):
        response.close()
        raise tuf_errors.DownloadError(f"{url} answered a Range request with Content-Range {content_range!r}")


def _skipped(chunks: Iterator[bytes], skip: int) -> Iterator[bytes]:
    """Drop the first ``skip`` bytes (a server that ignored ``Range`` resent them)."""
    for chunk in chunks:
        if skip >= len(chunk):
            skip -= len(chunk)
            continue
        yield chunk[skip:]
        skip = 0


def _read_chunks(path: Path, length: int) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while length > 0 and (chunk := f.read(min(_CHUNK_BYTES, length))):
            length -= len(chunk)
            yield chunk


def _drop(path: Path | None) -> None:
    if path is not None:
        path.unlink(missing_ok=True)


class TufClient:
    """Verified metadata and target downloads from one TUF repository (the device agent's view).

    ``trusted_root`` is the root the device was given at enrollment; later runs may pass ``None``
    and rely on the root cached in ``metadata_dir`` (which only ever holds verified roots).
    Use one client per state directory at a time (ngclient's rule: no concurrent updaters).
    """

    def __init__(
        self,
        metadata_dir: str | Path,
        targets_dir: str | Path,
        metadata_base_url: str,
        targets_base_url: str,
        trusted_root: bytes | None = None,
        http: httpx.Client | None = None,
        headers: Mapping[str, str] | None = None,
        *,
        bearer_token: str | None = None,
        timeout_s: float = 30.0,
        connect_timeout_s: float = 10.0,
        max_resumes: int = 5,
        stall_window_s: float = 60.0,
        min_bytes_per_window: int = 1024,
        config: UpdaterConfig | None = None,
    ) -> None:
        self.metadata_dir = Path(metadata_dir)
        self.targets_dir = Path(targets_dir)
        self.metadata_base_url = _with_slash(metadata_base_url)
        self.targets_base_url = _with_slash(targets_base_url)
        self.trusted_root = trusted_root
        self._owns_http = http is None
        timeout = httpx.Timeout(timeout_s, connect=connect_timeout_s)
        self.http = http or httpx.Client(timeout=timeout, headers={"User-Agent": "edgefleet-agent"})
        self.fetcher = HttpxFetcher(
            self.http,
            headers=headers,
            max_resumes=max_resumes,
            partial_dir=self.targets_dir / ".partial",
            partial_url_prefix=self.targets_base_url,
            stall_window_s=stall_window_s,
            min_bytes_per_window=min_bytes_per_window,
        )
        if bearer_token is not None:
            self.set_bearer_token(bearer_token)
        self.config = config or UpdaterConfig(app_user_agent="edgefleet-agent")
        self._updater: Updater | None = None

    @property
    def headers(self) -> dict[str, str]:
        """Headers sent with every request (mutable: a new access token takes effect at once)."""
        return self.fetcher.headers

    def set_bearer_token(self, token: str) -> None:
        """Send ``Authorization: Bearer <token>`` from now on."""
        self.fetcher.headers["Authorization"] = f"Bearer {token}"

    def refresh(self) -> None:
        """Run the TUF update workflow: root rotations, then timestamp, snapshot and targets."""
        updater = self._new_updater()
        with _mapped_errors("metadata", self.metadata_base_url):
            updater.refresh()
        self._updater = updater

    def target_info(self, path: str) -> TargetFile:
        """The verified length, hashes and custom field of ``path`` (refreshing first if needed)."""
        if self._updater is None:
            self.refresh()
        assert self._updater is not None
        with _mapped_errors("metadata", path):
            info = self._updater.get_targetinfo(path)
        if info is None:
            raise UnknownTargetError(f"target {path} is not listed in the signed targets metadata")
        return info

    def cached_path(self, path: str) -> Path | None:
        """The local file of ``path`` if it is present and matches the signed length and hash."""
        info = self.target_info(path)
        assert self._updater is not None
        found = self._updater.find_cached_target(info)
        return None if found is None else Path(found)

    def download(self, path: str) -> Path:
        """The verified local file of target ``path``: from the cache, or downloaded (resumably)."""
        info = self.target_info(path)
        assert self._updater is not None
        cached = self._updater.find_cached_target(info)
        if cached is not None:
            return Path(cached)
        self.targets_dir.mkdir(parents=True, exist_ok=True)
        with _mapped_errors("target", path):
            return Path(self._updater.download_target(info))

    def trusted_root_version(self) -> int:
        """The version of the newest root this client has verified."""
        updater = self._updater or self._new_updater()
        return updater._trusted_set.root.version  # noqa: SLF001

    def close(self) -> None:
        """Close the HTTP client if this object created it."""
        if self._owns_http:
            self.http.close()

    def __enter__(self) -> TufClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _new_updater(self) -> Updater:
        """A fresh ngclient ``Updater`` (one refresh each, as ngclient requires)."""
        self.metadata_dir.mkdir(parents=True, exist_ok=True)
        if self.trusted_root is None and not (self.metadata_dir / "root.json").exists():
            raise ConfigError(f"no trusted root: pass trusted_root or put root.json in {self.metadata_dir}")
        with _mapped_errors("metadata", "trusted root"):
            return Updater(
                str(self.metadata_dir),
                self.metadata_base_url,
                str(self.targets_dir),
                self.targets_base_url,
                fetcher=self.fetcher,
                config=self.config,
                bootstrap=self.trusted_root,
            )


@contextlib.contextmanager
def _mapped_errors(stage: str, what: str) -> Iterator[None]:
    """Translate tuf and httpx exceptions into :mod:`bundles.errors` (``stage``: metadata or target)."""
    try:
        yield
    except tuf_errors.ExpiredMetadataError as e:
        raise ExpiredMetadataError(f"refusing expired metadata from {what}: {e}") from e
    except tuf_errors.UnsignedMetadataError as e:
        raise BadSignatureError(f"refusing metadata from {what} without a threshold of valid signatures: {e}") from e
    except tuf_errors.BadVersionNumberError as e:
        raise RollbackAttackError(f"refusing metadata from {what} older than the trusted version: {e}") from e
    except (tuf_errors.LengthOrHashMismatchError, tuf_errors.DownloadLengthMismatchError) as e:
        raise _mismatch(stage, what, e) from e
    except tuf_errors.DownloadHTTPError as e:
        raise _http_error(what, e) from e
    except tuf_errors.SlowRetrievalError as e:
        raise TransportError(f"download from {what} is too slow: {e}") from e
    except tuf_errors.DownloadError as e:
        raise TransportError(f"cannot download from {what}: {_root_cause(e)}") from e
    except tuf_errors.RepositoryError as e:
        raise TrustError(f"refusing metadata from {what}: {e}") from e
    except httpx.HTTPError as e:
        raise TransportError(f"cannot download from {what}: {e}") from e


def _mismatch(stage: str, what: str, e: Exception) -> TrustError:
    if stage == "target":
        return TargetMismatchError(f"target {what} does not match its signed length and sha256: {e}")
    return MixAndMatchError(f"metadata from {what} does not match the length or hash its parent lists: {e}")


def _http_error(what: str, e: tuf_errors.DownloadHTTPError) -> TransportError | AuthError:
    if e.status_code in (401, 403):
        return AuthError(f"the repository refused access to {what} (HTTP {e.status_code})")
    if e.status_code >= 500 or e.status_code == 429:
        return ServerError(f"the repository failed for {what} (HTTP {e.status_code})")
    return TransportError(f"the repository answered HTTP {e.status_code} for {what}")


def _root_cause(e: BaseException) -> str:
    while e.__cause__ is not None:
        e = e.__cause__
    return str(e) or type(e).__name__


def _with_slash(url: str) -> str:
    return url if url.endswith("/") else url + "/"


__all__ = ["HttpxFetcher", "TufClient"]
