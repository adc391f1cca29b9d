"""The parts of the fallback chain: circuit breaker, result cache, cloud client, static answers.

``device_agent.serving.ServingPipeline`` decides *when* to fall back (local error, no local model,
deadline, low confidence) and walks the chain; this module holds the pieces it walks:

- :class:`CircuitBreaker`: after ``failure_threshold`` consecutive cloud failures the breaker opens
  and the cloud is skipped (no request, no timeout) for ``reset_s``; then one probe is let through
  (half-open): success closes it, failure opens it again. A dead cloud is not hammered.
- :class:`ResultCache`: bounded LRU of answers keyed by (model, bundle version, input hash), filled
  only for bundles whose ``runtime_config.deterministic`` is true.
- :class:`OipClient`: the Open Inference Protocol v2 REST client over httpx (the tensor codec is
  :mod:`bundles.oip`, the cloud endpoint's own).
- :func:`static_outputs`: the bundle's declared ``runtime_config.static_answer`` as tensors.
"""

from __future__ import annotations

import hashlib
import sys
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np

from bundles import oip
from bundles.errors import InferenceError, InputError, RequestTooLargeError, ServerError, TransportError
from bundles.manifest import Manifest

# --- circuit breaker -------------------------------------------------------------------------

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"


class CircuitBreaker:
    """Closed -> open after N consecutive failures -> half-open after ``reset_s`` -> closed on success."""

    def __init__(
        self,
        failure_threshold: int = 3,
        reset_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[str, int], object] | None = None,
    ) -> None:
        self.failure_threshold, self.reset_s, self.clock = failure_threshold, reset_s, clock
        self.on_change = on_change
        self.state = CLOSED
        self.failures = 0
        self.opened_at = 0.0
        self._probing = False
        self._lock = threading.Lock()

    def allow(self) -> bool:
        """May a request go to the cloud now? In half-open state only one probe at a time may."""
        with self._lock:
            if self.state == CLOSED:
                return True
            if self.state == OPEN and self.clock() - self.opened_at >= self.reset_s:
                self._set(HALF_OPEN)
            if self.state == HALF_OPEN and not self._probing:
                self._probing = True
                return True
            return False

    def success(self) -> None:
        with self._lock:
            self.failures, self._probing = 0, False
            if self.state != CLOSED:
                self._set(CLOSED)

    def failure(self) -> None:
        with self._lock:
            self.failures += 1
            self._probing = False
            if self.state == HALF_OPEN or self.failures >= self.failure_threshold:
                self.opened_at = self.clock()
                if self.state != OPEN:
                    self._set(OPEN)

    def _set(self, state: str) -> None:
        self.state = state
        if self.on_change is not None:
            self.on_change(state, self.failures)


# --- result cache ----------------------------------------------------------------------------


def input_key(inputs: Mapping[str, np.ndarray]) -> bytes:
    """A digest of the inputs (names, dtypes, shapes and bytes), the cache key of an identical input."""
    digest = hashlib.blake2b(digest_size=16)
    for name in sorted(inputs):
        arr = np.ascontiguousarray(inputs[name])
        digest.update(f"{name}|{arr.dtype.str}|{arr.shape}|".encode())
        digest.update(arr.tobytes() if arr.dtype.kind != "O" else repr(arr.tolist()).encode())
    return digest.digest()


EXACT_KEY_MAX_BYTES = 1024
"""Single-tensor inputs up to this size are their own cache key (the bytes: exact, no hashing pass)."""


def cache_key(inputs: Mapping[str, Any], max_input_bytes: int) -> Hashable | None:
    """The result-cache key of ``inputs``, or None when they are too large to cache.

    A small single-tensor input (the common batch-1 request) is keyed by its name, dtype, shape and
    raw bytes: the dict lookup then compares bytes exactly, so there is no collision risk and no
    digest pass (~1 µs instead of ~7). Anything else goes through :func:`input_key`.
    """
    if len(inputs) == 1:
        for name, value in inputs.items():
            if type(value) is np.ndarray and value.dtype.kind != "O" and value.nbytes <= EXACT_KEY_MAX_BYTES:
                return (name, value.dtype.str, value.shape, value.tobytes())
    if sum(int(getattr(value, "nbytes", 0)) for value in inputs.values()) > max_input_bytes:
        return None
    return input_key(inputs)


class ResultCache:
    """A bounded LRU of answers by (model, version, input key).

    The request path only *remembers* an answer (:meth:`remember`: a copy of the small input and a
    deque append, well under a microsecond); keys are computed when the cache is read
    (:meth:`get`, on the fallback path), for at most ``max_entries`` pending answers. Most devices
    never read their cache, so most inputs are never hashed.
    """

    def __init__(self, max_entries: int = 256) -> None:
        self.max_entries = max_entries
        self._items: OrderedDict[tuple[str, int, Hashable], dict[str, np.ndarray]] = OrderedDict()
        self._pending: deque[tuple[str, int, Mapping[str, Any], dict[str, np.ndarray]]] = deque(
            maxlen=max(1, max_entries)
        )
        self._lock = threading.Lock()

    def remember(
        self,
        model: str,
        version: int,
        inputs: Mapping[str, Any],
        outputs: Mapping[str, np.ndarray],
        max_input_bytes: int,
        copied: bool = False,
    ) -> None:
        """Note an answer for later lookups; inputs over ``max_input_bytes`` are not cached.

        ``copied`` says ``inputs`` is already a private copy of numpy arrays (the caller cannot change it).
        """
        if self.max_entries <= 0:
            return
        if copied:  # the caller's private dict: kept as it is
            copied_inputs = inputs if _nbytes(inputs) <= max_input_bytes else None
        else:
            copied_inputs = _copy_if_small(inputs, max_input_bytes)
        if copied_inputs is not None:
            self._pending.append((model, version, copied_inputs, dict(outputs)))  # deque.append is atomic

    def put(self, model: str, version: int, key: Hashable, outputs: Mapping[str, np.ndarray]) -> None:
        """Store an answer under a key already computed (:func:`cache_key`)."""
        if self.max_entries <= 0:
            return
        with self._lock:
            self._store((model, version, key), dict(outputs))

    def get(self, model: str, version: int, key: Hashable) -> dict[str, np.ndarray] | None:
        with self._lock:
            self._drain()
            found = self._items.get((model, version, key))
            if found is not None:
                self._items.move_to_end((model, version, key))
            return found

    def _store(self, entry: tuple[str, int, Hashable], outputs: dict[str, np.ndarray]) -> None:
        self._items[entry] = outputs
        self._items.move_to_end(entry)
        if len(self._items) > self.max_entries:
            self._items.popitem(last=False)

    def _drain(self) -> None:
        """Key the remembered answers, oldest first (lock held)."""
        while self._pending:
            model, version, inputs, outputs = self._pending.popleft()
            key = cache_key(inputs, sys.maxsize)
            if key is not None:
                self._store((model, version, key), outputs)

    def __len__(self) -> int:
        with self._lock:
            self._drain()
            return len(self._items)


def _nbytes(inputs: Mapping[str, Any]) -> int:
    if len(inputs) == 1:  # no generator for the common case
        for value in inputs.values():
            return int(getattr(value, "nbytes", 0))
    return sum(int(getattr(value, "nbytes", 0)) for value in inputs.values())


def _copy_if_small(inputs: Mapping[str, Any], max_input_bytes: int) -> dict[str, np.ndarray] | None:
    """A private copy of the inputs (the caller may reuse its arrays), or None if they are too large."""
    if len(inputs) == 1:
        for name, value in inputs.items():
            if type(value) is np.ndarray:
                return {name: value.copy()} if value.nbytes <= max_input_bytes else None
    if _nbytes(inputs) > max_input_bytes:
        return None
    return {name: np.array(value) for name, value in inputs.items()}


# --- static answer ---------------------------------------------------------------------------


def static_outputs(manifest: Manifest | None) -> dict[str, np.ndarray] | None:
    """The bundle's ``static_answer`` as arrays; values are EncodedTensor dicts or plain JSON values."""
    if manifest is None or not manifest.runtime_config.static_answer:
        return None
    out: dict[str, np.ndarray] = {}
    for name, value in manifest.runtime_config.static_answer.items():
        if isinstance(value, Mapping) and {"dtype", "shape", "data"} <= set(value):
            from bundles.manifest import EncodedTensor
            from bundles.tensors import decode_tensor

            out[name] = decode_tensor(EncodedTensor.from_dict(value, f"static_answer.{name}"))
        else:
            out[name] = np.asarray(value)
    return out


# --- confidence ------------------------------------------------------------------------------


def confidence_of(raw: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray]) -> float | None:
    """The lowest top-1 probability over the batch: from ``probabilities`` if present, else softmax of the
    first raw output. None when there is no floating-point score."""
    scores = outputs.get("probabilities")
    if scores is None:
        first = next(iter(raw.values()), None)
        if first is None or np.asarray(first).dtype.kind != "f":
            return None
        logits = np.asarray(first, dtype=np.float64)
        logits = logits - logits.max(axis=-1, keepdims=True)
        scores = np.exp(logits) / np.exp(logits).sum(axis=-1, keepdims=True)
    top = np.asarray(scores, dtype=np.float64).max(axis=-1)
    return float(np.min(top)) if top.size else None


# --- Open Inference Protocol v2 client -------------------------------------------------------


class OipClient:
    """Open Inference Protocol v2 REST client: ``POST {base}/models/{name}/infer``.

    ``base_url`` ends with ``/v2`` (the desired state's ``fallback.url``). Small requests go as JSON
    tensors; when the numeric inputs weigh ``binary_threshold_bytes`` or more, the request uses the
    binary tensor extension (JSON header, then raw little-endian bytes, ``Inference-Header-Content-
    Length``) and asks for binary outputs, since JSON costs ~5x the bytes and most of the time for an
    image. Transport failures and 5xx answers are :class:`TransportError` / :class:`ServerError` (they
    count against the breaker, as does 429); the cloud refusing the request's inputs (400, 413) is the
    client's error, :class:`InputError` / :class:`RequestTooLargeError` as the device itself would raise
    (the device's API answers the same status); other 4xx answers (401, 403, 404: this device or model
    is not served there) are :class:`InferenceError` carrying the server's ``error``.
    """

    def __init__(
        self,
        base_url: str,
        timeout_s: float = 2.0,
        client: httpx.Client | None = None,
        binary_threshold_bytes: int = 16 * 1024,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        """``headers`` go with every request (the device's bearer token for the fleet's endpoint)."""
        self.base_url = base_url.rstrip("/")
        self.headers = dict(headers or {})
        self.timeout_s = timeout_s
        self.binary_threshold_bytes = binary_threshold_bytes
        self._owned = client is None
        self.client = client or httpx.Client(timeout=timeout_s)
        self._dtypes: dict[str, dict[str, np.dtype[Any]]] = {}

    def infer(self, model: str, inputs: Mapping[str, np.ndarray], version: int | None = None) -> CloudAnswer:
        """Run ``model`` in the cloud; the answer's outputs as numpy arrays, and what it says of them."""
        path = f"/models/{model}" + (f"/versions/{version}" if version is not None else "") + "/infer"
        arrays = {name: np.asarray(value) for name, value in inputs.items()}
        numeric_bytes = sum(a.nbytes for a in arrays.values() if a.dtype.kind not in "USO")
        try:
            content, headers = oip.encode_request(arrays, binary=numeric_bytes >= self.binary_threshold_bytes)
        except InputError as e:  # a dtype the protocol cannot carry: nothing the cloud could answer
            raise InferenceError(f"cannot send these inputs to the cloud: {e}") from e
        response = self._post(self.base_url + path, content, headers)
        return parse_response(response, model)

    def _post(self, url: str, content: bytes, headers: dict[str, str]) -> httpx.Response:
        try:
            response = self.client.post(
                url, content=content, headers={**self.headers, **headers}, timeout=self.timeout_s
            )
        except httpx.HTTPError as e:
            raise TransportError(f"cloud inference at {url} failed: {type(e).__name__}: {e}") from e
        if response.status_code >= 500 or response.status_code == 429:
            raise ServerError(f"cloud inference at {url} answered {response.status_code}: {_error_text(response)}")
        if response.status_code in (400, 413):
            kind = RequestTooLargeError if response.status_code == 413 else InputError
            raise kind(f"the cloud refused the inputs ({response.status_code}): {_error_text(response)}")
        if response.status_code >= 400:
            raise InferenceError(f"cloud inference at {url} refused the request: {_error_text(response)}")
        return response

    def input_dtypes(self, model: str) -> dict[str, np.dtype[Any]]:
        """The datatype of each input of ``model`` as the cloud declares it (``GET {base}/models/{model}``).

        What the fallback converts a request to when no local model declares it (nothing loaded). Read
        once per model; an answer without usable metadata gives ``{}`` (the inputs are sent as they are),
        a transport failure or a 5xx raises like :meth:`infer` (it counts against the breaker).
        """
        found = self._dtypes.get(model)
        if found is not None:
            return found
        url = f"{self.base_url}/models/{model}"
        try:
            response = self.client.get(url, headers=self.headers, timeout=self.timeout_s)
        except httpx.HTTPError as e:
            raise TransportError(f"cloud metadata at {url} failed: {type(e).__name__}: {e}") from e
        if response.status_code >= 500 or response.status_code == 429:
            raise ServerError(f"cloud metadata at {url} answered {response.status_code}: {_error_text(response)}")
        found = _declared_dtypes(response) if response.status_code == 200 else {}
        if response.status_code == 200:
            self._dtypes[model] = found
        return found

    def ready(self, model: str) -> bool:
        """``GET {base}/models/{model}/ready`` answers 200 (what tritonclient checks too)."""
        try:
            answer = self.client.get(
                f"{self.base_url}/models/{model}/ready", headers=self.headers, timeout=self.timeout_s
            )
            return answer.status_code == 200
        except httpx.HTTPError:
            return False

    def close(self) -> None:
        if self._owned:
            self.client.close()


def binary_request(arrays: Mapping[str, np.ndarray]) -> tuple[bytes, dict[str, str]]:
    """A binary-extension request body: numeric tensors as raw bytes, strings as JSON; binary outputs asked."""
    return oip.encode_request(arrays, binary=True)


@dataclass(frozen=True)
class CloudAnswer:
    """A cloud answer: its outputs, the version that ran (``model_version``, None if not said), and whether
    the bundle's post-processing already ran there (``parameters.postprocessed``, what edgefleet's endpoint
    says: its outputs hold the post-processed tensors, in place of raw ones of the same name). A plain
    OIP server (Triton...) answers raw model outputs, which the device post-processes itself."""

    outputs: dict[str, np.ndarray]
    version: int | None = None
    postprocessed: bool = False


def parse_response(response: httpx.Response, model: str) -> CloudAnswer:
    """Outputs of an OIP answer, JSON or binary extension (``Inference-Header-Content-Length``).

    An answer that is not a JSON object is the cloud failing (:class:`ServerError`, counted by the
    breaker); one with malformed outputs is an :class:`InferenceError` (the cloud is alive).
    """
    try:
        header, payload = oip.split_body(response.content, response.headers.get("inference-header-content-length"))
        answer = oip.parse_header(header, allow_constants=True)
    except InputError as e:
        raise ServerError(f"the cloud's answer for {model} is not an OIP answer: {e}") from e
    try:
        outputs = oip.decode_answer(answer, payload)
    except InputError as e:
        raise InferenceError(f"the cloud's answer for {model} is malformed: {e}") from e
    parameters = answer.get("parameters")
    postprocessed = isinstance(parameters, dict) and parameters.get("postprocessed") is True
    return CloudAnswer(outputs, _version(answer.get("model_version")), postprocessed)


def _version(value: Any) -> int | None:
    """An answer's ``model_version`` as the integer edgefleet versions are (None for anything else)."""
    text = str(value) if isinstance(value, (str, int)) and not isinstance(value, bool) else ""
    return int(text) if text.isdigit() and len(text) < 10 else None


def _declared_dtypes(response: httpx.Response) -> dict[str, np.dtype[Any]]:
    """Input name -> numpy dtype from OIP model metadata (``inputs: [{name, datatype}]``); ``{}`` if malformed."""
    try:
        specs = response.json().get("inputs")
        return {str(t["name"]): np.dtype(oip.DATATYPES[t["datatype"]]) for t in specs}
    except (ValueError, TypeError, KeyError, AttributeError):
        return {}


def _error_text(response: httpx.Response) -> str:
    try:
        data = response.json()
    except ValueError:
        return response.text[:200] or f"HTTP {response.status_code}"
    if isinstance(data, dict):
        return str(data.get("error") or data.get("detail") or data)[:200]
    return str(data)[:200]
