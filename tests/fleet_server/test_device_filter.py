"""The device filter language (pure logic) and its use through the admin API."""

from __future__ import annotations

import pytest

from bundles.errors import ConfigError
from fleet_server.services.device_filter import matches, parse_filter
from tests.fleet_server.conftest import default_inventory

PI = {"id": "dev-1", "fleet": "lab", "status": "accepted", "hw_class": "pi4", "arch": "aarch64", "os": "linux",
      "python": "3.11.2", "agent_version": "0.1.0", "memory_mb": 3800, "disk_free_mb": 20000,
      "capabilities": {"runtimes": {"onnxruntime": "1.20.1"}, "accelerators": ["cpu"]},
      "tags": ["canary"], "groups": ["berlin"]}  # fmt: skip


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ("hw=pi4 and runtime=onnxruntime>=1.20", True),
        ("hw=PI4 AND runtime=onnxruntime>=1.21", False),
        ("runtime=onnxruntime", True),
        ("runtime!=tflite", True),
        ("runtime=tflite", False),
        ("memory_mb>=2048 and disk_free_mb<30000", True),
        ("python>=3.10 and agent<0.2", True),
        ("python>=3.12", False),
        ("tag=canary and group=berlin", True),
        ("tag!=canary", False),
        ("accelerator=cpu", True),
        ("arch!=x86_64 and status=accepted and fleet=lab", True),
        ("", True),
    ],
)
def test_filter_expressions(expression, expected):
    assert matches(parse_filter(expression), PI) is expected


@pytest.mark.parametrize("expression", ["hw", "colour=red", "memory_mb>=lots", "tag>=a", "runtime>=onnxruntime",
                                        "hw=pi4 and"])  # fmt: skip
def test_malformed_filters_name_the_problem(expression):
    with pytest.raises(ConfigError):
        parse_filter(expression)


def test_device_list_filters_through_the_api(client, make_device, admin_headers):
    pi, jetson = make_device(hw_class="pi4"), make_device(hw_class="jetson")
    inventory = default_inventory("jetson")
    inventory["capabilities"]["runtimes"] = {"onnxruntime": "1.18.0"}
    client.put("/api/v1/device/inventory", headers=jetson.headers, json=inventory)
    listed = client.get("/api/v1/admin/devices", params={"filter": "runtime=onnxruntime>=1.20"}, headers=admin_headers)
    assert [d["id"] for d in listed.json()["data"]] == [pi.device_id]
    client.put("/api/v1/admin/filters", headers=admin_headers, json={"name": "jets", "expression": "hw=jetson"})
    saved = client.get("/api/v1/admin/devices", params={"saved_filter": "jets"}, headers=admin_headers).json()
    assert [d["id"] for d in saved["data"]] == [jetson.device_id]
    bad = client.get("/api/v1/admin/devices", params={"filter": "colour=red"}, headers=admin_headers)
    assert bad.status_code == 400 and "colour" in bad.json()["detail"]


def test_listing_pages_through_the_fleet_in_chunks(client, make_device, admin_headers, monkeypatch):
    from fleet_server.services import fleet

    monkeypatch.setattr(fleet, "LIST_CHUNK_DEVICES", 2)
    devices = sorted(make_device(hw_class="pi4" if i % 2 else "jetson").device_id for i in range(5))
    everything = client.get("/api/v1/admin/devices", headers=admin_headers).json()["data"]
    assert [d["id"] for d in everything] == devices
    page = client.get("/api/v1/admin/devices", params={"filter": "hw=pi4", "limit": 1, "offset": 1},
                      headers=admin_headers).json()["data"]  # fmt: skip
    pis = [d["id"] for d in everything if d["hw_class"] == "pi4"]
    assert [d["id"] for d in page] == pis[1:2]
