"""The localhost HTTP API: the Open Inference Protocol (KServe v2 REST), so apps can point at the
device or the cloud endpoint with the same client.

Endpoints: ``GET /v2/health/live``, ``GET /v2/health/ready``, ``GET /v2`` (server metadata),
``GET /v2/models/{m}`` (model metadata), ``GET /v2/models/{m}/ready``, ``POST /v2/models/{m}/infer``
(also under ``/versions/{v}/``), plus ``GET /edgefleet/status`` (what ``edgefleet-agent status``
shows). Tensors are JSON (``{"name", "shape", "datatype", "data"}``, data row-major and flat or
nested); the binary tensor extension is supported: with ``Inference-Header-Content-Length`` the JSON
header is followed by raw little-endian tensor bytes (``"parameters": {"binary_data_size": n}``),
and outputs asked with ``"parameters": {"binary_data": true}`` come back the same way. Errors are
``{"error": "<one sentence>"}`` with 400 (bad request), 404 (no such model or path), 413 (too
large) or 503 (not ready, busy: with ``Retry-After``). Served by the standard library's
``ThreadingHTTPServer`` (no web framework on the device).
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np

from bundles.errors import BusyError, ConfigError, EdgeFleetError, InferenceError, InputError, ModelNotReadyError
from device_agent.version import AGENT_VERSION

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 64 * 2**20
DATATYPES = {
    "BOOL": "bool", "UINT8": "uint8", "UINT16": "uint16", "UINT32": "uint32", "UINT64": "uint64",
    "INT8": "int8", "INT16": "int16", "INT32": "int32", "INT64": "int64",
    "FP16": "float16", "FP32": "float32", "FP64": "float64", "BYTES": "object",
}  # fmt: skip
_MANIFEST_TO_OIP = {"bool": "BOOL", "uint8": "UINT8", "int8": "INT8", "uint16": "UINT16", "int16": "INT16",
                    "int32": "INT32", "int64": "INT64", "float16": "FP16", "float32": "FP32", "float64": "FP64",
                    "string": "BYTES"}  # fmt: skip


class HttpError(Exception):
    """An answer other than 200, with its status and one readable sentence."""

    def __init__(self, status: int, message: str, retry_after_s: int | None = None) -> None:
        super().__init__(message)
        self.status, self.retry_after_s = status, retry_after_s


def oip_datatype(dtype: np.dtype[Any]) -> str:
    """The OIP datatype name of a numpy dtype."""
    if dtype.kind in ("U", "S", "O"):
        return "BYTES"
    for name, np_name in DATATYPES.items():
        if np_name == dtype.name:
            return name
    raise InputError(f"numpy dtype {dtype} has no Open Inference Protocol datatype")


def decode_input(spec: dict[str, Any], binary: bytes | None) -> np.ndarray:
    """One OIP input tensor (JSON data, or raw bytes from the binary extension) as a numpy array."""
    try:
        name, shape, datatype = spec["name"], [int(d) for d in spec["shape"]], spec["datatype"]
    except (KeyError, TypeError, ValueError) as e:
        raise HttpError(400, "each input needs 'name', 'shape' (integers) and 'datatype'") from e
    if datatype not in DATATYPES:
        raise HttpError(400, f"input '{name}': datatype '{datatype}' is not one of {', '.join(DATATYPES)}")
    dtype = np.dtype(DATATYPES[datatype])
    try:
        if binary is not None:
            if datatype == "BYTES":
                raise HttpError(400, f"input '{name}': binary BYTES tensors are not supported, send JSON")
            array = np.frombuffer(binary, dtype=dtype.newbyteorder("<")).astype(dtype)
        else:
            array = np.asarray(spec.get("data"), dtype=dtype)
        return array.reshape(shape)
    except (ValueError, TypeError) as e:
        raise HttpError(400, f"input '{name}': data does not match shape {shape} and datatype {datatype}") from e


def encode_output(name: str, value: Any, binary: bool) -> tuple[dict[str, Any], bytes | None]:
    """One output tensor as OIP JSON, or as a header plus raw bytes when ``binary``."""
    array = np.asarray(value)
    datatype = oip_datatype(array.dtype)
    tensor: dict[str, Any] = {"name": name, "shape": list(array.shape), "datatype": datatype}
    if binary and datatype != "BYTES":
        raw = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
        tensor["parameters"] = {"binary_data_size": len(raw)}
        return tensor, raw
    flat = array.reshape(-1)
    tensor["data"] = [str(v) for v in flat] if datatype == "BYTES" else flat.tolist()
    return tensor, None


class InferenceApi:
    """The protocol logic, independent of the HTTP server (so it is easy to test and reuse)."""

    def __init__(self, agent: Any) -> None:
        self.agent = agent

    def server_metadata(self) -> dict[str, Any]:
        return {"name": "edgefleet-agent", "version": AGENT_VERSION, "extensions": ["binary_tensor_data"]}

    def status(self) -> dict[str, Any]:
        return dict(self.agent.status())

    def live(self) -> dict[str, Any]:
        return {"live": True}

    def ready(self) -> dict[str, Any]:
        """Ready only when every model this device should answer is served locally (else 503 saying which not)."""
        models = self.agent.readiness()
        missing = {name: m["problem"] for name, m in models.items() if not m["ready"]}
        if not models or missing:
            detail = "; ".join(f"{name}: {problem}" for name, problem in missing.items())
            raise HttpError(503, f"not ready: {detail}" if detail else "no model is loaded on this device yet")
        return {"ready": True, "models": sorted(models)}

    def model_ready(self, model: str) -> dict[str, Any]:
        if not self.agent.engine.ready(model):
            raise HttpError(503, f"model '{model}' is not loaded on this device")
        return {"name": model, "ready": True}

    def model_metadata(self, model: str) -> dict[str, Any]:
        manifest = self.agent.engine.active_manifest(model)
        if manifest is None:
            raise HttpError(404, f"model '{model}' is not installed on this device")

        def tensors(specs: Any) -> list[dict[str, Any]]:
            return [{"name": t.name, "datatype": _MANIFEST_TO_OIP[t.dtype], "shape": list(t.shape)} for t in specs]

        return {"name": model, "versions": [str(manifest.version)], "platform": "edgefleet",
                "inputs": tensors(manifest.inputs), "outputs": tensors(manifest.outputs)}  # fmt: skip

    def infer(self, model: str, header: dict[str, Any], binary: bytes) -> tuple[dict[str, Any], bytes]:
        """Run one OIP inference request; returns the JSON answer and any binary output bytes."""
        inputs = self._inputs(header, binary)
        result = self.agent.predict(inputs, model=model)
        wanted = _requested_outputs(header)
        available = {**result.raw, **result.outputs}
        names = list(result.outputs) if not wanted else list(wanted)
        missing = [n for n in names if n not in available]
        if missing:
            raise HttpError(400, f"model '{model}' has no output(s) {', '.join(missing)}")
        default_binary = bool((header.get("parameters") or {}).get("binary_data_output", False))
        outputs, chunks = [], []
        for name in names:
            tensor, raw = encode_output(name, available[name], wanted.get(name, default_binary))
            outputs.append(tensor)
            if raw is not None:
                chunks.append(raw)
        answer = {"model_name": model, "model_version": None if result.version is None else str(result.version),
                  "outputs": outputs,
                  "parameters": {"source": result.source, "fallback_reason": result.fallback_reason,
                                 "latency_ms": round(result.latency_ms, 3)}}  # fmt: skip
        if "id" in header:
            answer["id"] = header["id"]
        return answer, b"".join(chunks)

    def _inputs(self, header: dict[str, Any], binary: bytes) -> dict[str, np.ndarray]:
        specs = header.get("inputs")
        if not isinstance(specs, list) or not specs:
            raise HttpError(400, "the request needs a non-empty 'inputs' list")
        inputs, offset = {}, 0
        for spec in specs:
            if not isinstance(spec, dict):
                raise HttpError(400, "each input must be an object")
            size = (spec.get("parameters") or {}).get("binary_data_size")
            chunk = None
            if size is not None:
                chunk, offset = binary[offset : offset + int(size)], offset + int(size)
                if len(chunk) != int(size):
                    raise HttpError(400, f"input '{spec.get('name')}': the binary body is shorter than declared")
            inputs[str(spec.get("name"))] = decode_input(spec, chunk)
        return inputs


def _requested_outputs(header: dict[str, Any]) -> dict[str, bool]:
    """Requested output names -> whether each wants binary data (empty: all outputs, JSON)."""
    wanted = header.get("outputs") or []
    if not isinstance(wanted, list):
        raise HttpError(400, "'outputs' must be a list of {\"name\": ...}")
    return {str(o.get("name")): bool((o.get("parameters") or {}).get("binary_data", False))
            for o in wanted if isinstance(o, dict)}  # fmt: skip


def error_status(e: Exception) -> tuple[int, int | None]:
    """HTTP status (and Retry-After seconds) for an error raised while answering."""
    if isinstance(e, HttpError):
        return e.status, e.retry_after_s
    if isinstance(e, BusyError):
        return 503, 1
    if isinstance(e, (InputError, ConfigError)):
        return 400, None
    if isinstance(e, ModelNotReadyError):
        return 503, 5
    if isinstance(e, (InferenceError, EdgeFleetError)):
        return 503, 1
    return 500, None


class _Handler(BaseHTTPRequestHandler):
    api: InferenceApi
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out in two writes: no 40 ms delayed-ACK stall
    server_version = f"edgefleet-agent/{AGENT_VERSION}"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the stdlib's signature
        log.debug("http: " + format, *args)

    def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
        self._answer(lambda: self._get(self.path.split("?", 1)[0].rstrip("/")))

    def do_POST(self) -> None:  # noqa: N802 - the stdlib's name
        self._answer(self._post)

    def _get(self, path: str) -> tuple[dict[str, Any], bytes]:
        api, parts = self.api, path.split("/")
        routes: dict[str, Callable[[], dict[str, Any]]] = {
            "/v2/health/live": api.live, "/v2/health/ready": api.ready, "/v2": api.server_metadata,
            "/edgefleet/status": api.status,
        }  # fmt: skip
        if path in routes:
            return routes[path](), b""
        if len(parts) == 4 and parts[:3] == ["", "v2", "models"]:
            return api.model_metadata(parts[3]), b""
        if len(parts) == 5 and parts[:3] == ["", "v2", "models"] and parts[4] == "ready":
            return api.model_ready(parts[3]), b""
        raise HttpError(404, f"no such endpoint: GET {path}")

    def _post(self) -> tuple[dict[str, Any], bytes]:
        parts = self.path.split("?", 1)[0].rstrip("/").split("/")
        infer = len(parts) in (5, 7) and parts[:3] == ["", "v2", "models"] and parts[-1] == "infer"
        if not infer or (len(parts) == 7 and parts[4] != "versions"):
            raise HttpError(404, f"no such endpoint: POST {self.path}")
        header, binary = self._read_body()
        return self.api.infer(parts[3], header, binary)

    def _read_body(self) -> tuple[dict[str, Any], bytes]:
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY_BYTES:
            raise HttpError(413, f"the request body is over {MAX_BODY_BYTES} bytes")
        body = self.rfile.read(length)
        header_len = int(self.headers.get("Inference-Header-Content-Length") or length)
        try:
            header = json.loads(body[:header_len] or b"{}")
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise HttpError(400, f"the request body is not valid JSON: {e}") from e
        if not isinstance(header, dict):
            raise HttpError(400, "the request body must be a JSON object")
        return header, body[header_len:]

    def _answer(self, handler: Any) -> None:
        try:
            answer, binary = handler()
            self._send(200, answer, binary)
        except Exception as e:  # every error becomes a JSON answer, never a traceback
            status, retry_after = error_status(e)
            if status == 500:
                log.exception("http: unexpected error")
            self._send(status, {"error": str(e) if status != 500 else "internal error"}, b"", retry_after)

    def _send(self, status: int, answer: dict[str, Any], binary: bytes, retry_after_s: int | None = None) -> None:
        body = json.dumps(answer, separators=(",", ":")).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json" if not binary else "application/octet-stream")
        if binary:
            self.send_header("Inference-Header-Content-Length", str(len(body)))
        if retry_after_s is not None:
            self.send_header("Retry-After", str(retry_after_s))
        self.send_header("Content-Length", str(len(body) + len(binary)))
        self.end_headers()
        self.wfile.write(body + binary)


class AgentHttpServer:
    """The OIP server for one agent, on a background thread."""

    def __init__(self, agent: Any, host: str = "127.0.0.1", port: int = 8181) -> None:
        handler = type("Handler", (_Handler,), {"api": InferenceApi(agent)})
        self.httpd = ThreadingHTTPServer((host, port), handler)
        self.httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> AgentHttpServer:
        self._thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="edgefleet-http", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
