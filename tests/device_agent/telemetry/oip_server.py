"""A minimal Open Inference Protocol v2 REST server on loopback, for fallback tests.

It runs a real model (``bundles.predictor.Predictor.run_model``: the raw model outputs, as a cloud
endpoint would) behind ``POST /v2/models/{name}/infer`` and ``GET /v2/models/{name}/ready``.
``fail_with`` makes it answer an error status (a sick cloud); ``requests`` counts inference calls and
``authorizations`` holds each call's ``Authorization`` header (None when there was none).
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np

_DTYPES = {"FP32": np.float32, "FP64": np.float64, "INT64": np.int64, "INT32": np.int32}


class OipServer:
    def __init__(self, models: dict[str, Any]) -> None:
        self.models = models
        self.fail_with: int | None = None
        self.requests = 0
        self.authorizations: list[str | None] = []
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.01,), daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/v2"

    def __enter__(self) -> OipServer:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *_: object) -> None:
                return

            def _send(self, status: int, body: dict[str, Any]) -> None:
                raw = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def do_GET(self) -> None:
                parts = self.path.strip("/").split("/")
                ready = len(parts) == 4 and parts[3] == "ready" and parts[2] in outer.models
                self._send(200 if ready else 404, {"name": parts[2] if len(parts) > 2 else "", "ready": ready})

            def do_POST(self) -> None:
                outer.requests += 1
                outer.authorizations.append(self.headers.get("Authorization"))
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if outer.fail_with is not None:
                    self._send(outer.fail_with, {"error": "the cloud is unwell"})
                    return
                name = self.path.strip("/").split("/")[2]
                predictor = outer.models.get(name)
                if predictor is None:
                    self._send(404, {"error": f"unknown model {name}"})
                    return
                feeds = {
                    t["name"]: np.asarray(t["data"], _DTYPES[t["datatype"]]).reshape(t["shape"]) for t in body["inputs"]
                }
                outputs = predictor.run_model(feeds)
                answer = [
                    {"name": k, "datatype": "FP32", "shape": list(v.shape), "data": v.reshape(-1).tolist()}
                    for k, v in outputs.items()
                ]
                self._send(200, {"model_name": name, "outputs": answer})

        return Handler
