"""A fleet with published bundles and a running inference endpoint, shared by a whole test module.

``fleet`` (module): a fleet server (real app, SQLite, real TUF repository with a release root and
online keys) that has published ``tiny@1``, ``tiny@2`` (float32 in, logits and post-processed
probabilities/labels out), ``broken@1`` (fails its golden self-test) and ``echo@1`` (a ``BYTES`` and
an ``FP16`` input, echoed); an admin, an operator and a viewer key; an accepted device of fleet
``lab`` assigned ``tiny@1`` and ``echo@1``, and a device of fleet ``other`` with no assignment.
``make_endpoint(**settings)`` runs ``edgefleet-server inference``'s app on uvicorn on loopback for
that fleet; ``endpoint`` (module) is one with the defaults (lazy loading, batching on).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fastapi import FastAPI
from fastapi.testclient import TestClient

from fleet_server.app import create_app
from fleet_server.db import session_scope, upgrade_database
from fleet_server.settings import Settings
from tests.fleet_server.conftest import (
    TEST_PEPPER,
    Release,
    auth,
    default_inventory,
    enroll_device,
    serve_on_loopback,
)


@dataclass
class Fleet:
    """The arranged fleet server (see the module docstring)."""

    settings: Settings
    client: TestClient
    release: Release
    admin_key: str
    viewer_key: str
    operator_key: str
    device_token: str
    device_id: str
    other_device_token: str
    work: Path


@dataclass
class Served:
    """A running inference endpoint."""

    url: str
    fleet: Fleet
    app: FastAPI

    @property
    def host_port(self) -> str:
        return self.url.removeprefix("http://")


def write_graph_variant(bundle_dir: Path, base: Any, graph: Any) -> Any:
    """``graph`` saved as the model of ``base``'s first variant (opset 17); that variant with its new file."""
    import onnx
    from onnx import helper

    from bundles.archive import sha256_file
    from bundles.manifest import FileRef

    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = bundle_dir / "onnx-fp32" / "model.onnx"
    onnx.save_model(model, str(path))
    return dataclasses.replace(
        base.variants[0], files=(FileRef("onnx-fp32/model.onnx", sha256_file(path), path.stat().st_size),)
    )


def build_echo_bundle(bundle_dir: Path, name: str = "echo", version: int = 1) -> Any:
    """A bundle whose ONNX model echoes a BYTES input and doubles an FP16 one (golden cases included)."""
    from onnx import TensorProto, helper

    from bundles.manifest import DriftBaseline, Golden, GoldenCase, TensorSpec
    from bundles.tensors import encode_tensor
    from bundles.testing import build_bundle_dir, write_manifest

    base = build_bundle_dir(bundle_dir, name=name, version=version)
    graph = helper.make_graph(
        [helper.make_node("Identity", ["text"], ["text_out"]), helper.make_node("Add", ["half", "half"], ["half_out"])],
        "echo",
        [helper.make_tensor_value_info("text", TensorProto.STRING, ["batch"]),
         helper.make_tensor_value_info("half", TensorProto.FLOAT16, ["batch", 2])],
        [helper.make_tensor_value_info("text_out", TensorProto.STRING, ["batch"]),
         helper.make_tensor_value_info("half_out", TensorProto.FLOAT16, ["batch", 2])],
    )  # fmt: skip
    variant = write_graph_variant(bundle_dir, base, graph)
    half = np.array([[1.5, -2.0], [0.25, 4.0]], dtype=np.float16)
    text = np.array(["héllo", "wörld"], dtype=object)
    case = GoldenCase(inputs={"text": encode_tensor(text), "half": encode_tensor(half)},
                      expected={"text_out": encode_tensor(text), "half_out": encode_tensor(half * 2)})  # fmt: skip
    manifest = dataclasses.replace(
        base, task="other",
        inputs=(TensorSpec("text", "string", (-1,)), TensorSpec("half", "float16", (-1, 2))),
        outputs=(TensorSpec("text_out", "string", (-1,)), TensorSpec("half_out", "float16", (-1, 2))),
        features=(), postprocess=(), variants=(variant,), drift_baseline=DriftBaseline(),
        golden=Golden(cases=(case,), atol=1e-3, rtol=1e-3),
    )  # fmt: skip
    write_manifest(bundle_dir, manifest)
    return manifest


def build_broken_bundle(bundle_dir: Path) -> tuple[Path, Any]:
    """``broken@1``: a runnable bundle whose golden expected outputs are off, so its self-test fails."""
    from bundles.testing import build_bundle_dir, with_golden_offset, write_manifest

    manifest = with_golden_offset(build_bundle_dir(bundle_dir, name="broken", version=1), 1.0)
    write_manifest(bundle_dir, manifest)
    return bundle_dir, manifest


def publish_dir(release: Release, bundle_dir: Path, manifest: Any) -> None:
    """Publish an already built bundle directory through the admin API."""
    from bundles.archive import pack_variant

    name, version = manifest.name, manifest.version
    files = {f"{name}/{version}/manifest.json": bundle_dir / "manifest.json"}
    for variant in manifest.variants:
        out = release.work_dir / f"{name}-{version}-{variant.id}.tgz"
        files[f"{name}/{version}/{variant.id}.tar.gz"] = pack_variant(bundle_dir, manifest, variant.id, out)
    response = release.client.post("/api/v1/admin/publications", headers=release.headers,
                                   content=release.publication(name, version, files).read_bytes())  # fmt: skip
    assert response.status_code == 201, response.text


def _make_key(client: TestClient, role: str) -> str:
    from fleet_server.services.api_keys import create_api_key

    with session_scope(client.app.state.session_factory) as session:  # type: ignore[attr-defined]
        _, secret = create_api_key(session, name=f"test-{role}", role=role, actor="test", pepper=TEST_PEPPER)
    return secret


def _enroll(client: TestClient, fleet_name: str) -> dict[str, Any]:
    from fleet_server.services.enroll_tokens import create_enroll_token

    with session_scope(client.app.state.session_factory) as session:  # type: ignore[attr-defined]
        _, token = create_enroll_token(session, fleet=fleet_name, expires_in_s=3600, max_uses=None, actor="test",
                                       pepper=TEST_PEPPER)  # fmt: skip
    response = enroll_device(client, token, default_inventory(), Ed25519PrivateKey.generate())
    assert response.status_code == 200, response.text
    answer: dict[str, Any] = response.json()
    return answer


def make_release(client: TestClient, admin: dict[str, str], work: Path) -> Release:
    from bundles.tuf.keys import generate_key, key_from_dict
    from bundles.tuf.root import make_root

    client.app.state.tuf.create_online_keys()  # type: ignore[attr-defined]
    root_signer, targets_signer = generate_key(work / "root.pem"), generate_key(work / "targets.pem")
    online = client.get("/api/v1/admin/tuf/state", headers=admin).json()["online_keys"]
    root = make_root([root_signer], [targets_signer], key_from_dict(online["snapshot"]),
                     key_from_dict(online["timestamp"]))  # fmt: skip
    assert client.put("/api/v1/admin/tuf/root", headers=admin, content=root).status_code == 200
    return Release(client, admin, work, root_signer, targets_signer)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    base = tmp_path_factory.mktemp("fleet")
    url = f"sqlite:///{base / 'fleet.db'}"
    upgrade_database(url)
    settings = Settings(
        mode="production", data_dir=base / "data", database_url=url, public_url="https://fleet.test",
        token_pepper=TEST_PEPPER, background_tasks=False, json_logs=False, log_level="warning",
    )  # fmt: skip
    settings.data_dir.mkdir(parents=True)
    with TestClient(create_app(settings)) as client:
        admin_key = _make_key(client, "admin")
        work = base / "release"
        work.mkdir()
        release = make_release(client, auth(admin_key), work)
        release.publish("tiny", 1)
        release.publish("tiny", 2)
        echo_dir = base / "echo"
        publish_dir(release, echo_dir, build_echo_bundle(echo_dir))
        publish_dir(release, *build_broken_bundle(base / "broken"))
        device, other = _enroll(client, "lab"), _enroll(client, "other")
        for model, version in (("tiny", 1), ("echo", 1)):
            body = {"device_id": device["device_id"], "model_name": model, "bundle_version": version, "pinned": True}
            assert client.put("/api/v1/admin/assignments", headers=auth(admin_key), json=body).status_code == 200
        yield Fleet(settings, client, release, admin_key, _make_key(client, "viewer"), _make_key(client, "operator"),
                    device["access_token"], device["device_id"], other["access_token"], base)  # fmt: skip


serve = serve_on_loopback  # ``app`` on uvicorn on loopback (a port may be given); yields its base URL


def configured_for(fleet: Fleet, **inference: Any) -> Any:
    from fleet_server.inference.settings import Configured, InferenceSettings

    values = {"max_queue_delay_us": 1000, "threads": 2, **inference}
    return Configured(fleet.settings, InferenceSettings(**values))


@pytest.fixture(scope="module")
def make_endpoint(fleet: Fleet) -> Callable[..., Any]:
    """A context manager factory: ``with make_endpoint(**settings) as served`` runs another endpoint."""
    from fleet_server.inference.app import create_inference_app

    @contextlib.contextmanager
    def make(**inference: Any) -> Iterator[Served]:
        app = create_inference_app(configured_for(fleet, **inference))
        with serve(app) as url:
            yield Served(url, fleet, app)

    return make


@pytest.fixture(scope="module")
def endpoint(make_endpoint: Callable[..., Any]) -> Iterator[Served]:
    with make_endpoint() as served:
        yield served
