"""The gates refuse what must not ship, with the numbers, and the ladder records why."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from converter.home import Home
from converter.registry import Registry
from tests.converter.helpers import cli, ok, register_cnn


def _results(home: Path, name: str) -> dict[str, dict[str, object]]:
    registry = Registry(Home(home))
    return {r["variant_id"]: r for r in registry.latest_conversion(registry.get(name)).results}


def test_damaged_static_quantisation_and_slow_conv_integer_are_refused_with_their_figures(
    home: Path, digits_cnn: object, tmp_path: Path
) -> None:
    constant = tmp_path / "constant-calib.npz"
    np.savez(constant, x=np.zeros((64, 1, 8, 8), dtype=np.float32))  # calibration on constant data
    register_cnn("damaged", digits_cnn, calibration=constant)
    out = ok("convert", "damaged", "--targets", "onnx", "--quantize", "int8-static,int8-dynamic-all")
    results = _results(home, "damaged")

    static = results["onnx-int8-static"]
    assert static["status"] == "refused"
    reason = static["reasons"][0]
    assert reason.startswith("accuracy ") and "vs source" in reason and "> budget 0.0100" in reason
    assert static["metrics"]["metric_drop"] > 0.01  # the figures are kept, not only the verdict

    conv_integer = results["onnx-int8-dynamic-all"]
    assert conv_integer["status"] == "refused"
    assert any("slower than its fp32 parent at batch 32" in r for r in conv_integer["reasons"])
    assert any("slower than its fp32 parent at batch 1 " in r for r in conv_integer["reasons"])
    assert conv_integer["metrics"]["latency_ratio_to_fp32"] > 1.1
    assert conv_integer["metrics"]["latency_ratio_b1_to_fp32"] > 1.1

    assert results["onnx-fp32"]["status"] == "passed"
    assert "refused" in out
    code, _, err = cli("convert", "damaged", "--targets", "onnx", "--quantize", "int8-static", "--strict")
    assert code == 3
    assert err.strip().startswith("error: model damaged@1, variant onnx-int8-static: accuracy")
    assert len(err.strip().splitlines()) == 1


def test_entropy_calibration_builds_a_passing_static_variant_quietly(home: Path, digits_cnn: object) -> None:
    register_cnn("entropy", digits_cnn, "--calibration-method", "entropy", "--max-latency-ratio", "5")
    out = ok("convert", "entropy", "--targets", "onnx", "--quantize", "int8-static")
    static = _results(home, "entropy")["onnx-int8-static"]
    assert static["status"] == "passed", static["reasons"]
    assert static["metrics"]["metric_drop"] <= 0.01
    assert "Collecting tensor data" not in out  # the calibrator's progress prints stay out of the CLI output


def test_a_slower_variant_is_kept_with_its_reason_when_size_is_preferred(home: Path, digits_cnn: object) -> None:
    register_cnn("small", digits_cnn, "--prefer", "size")
    ok("convert", "small", "--targets", "onnx", "--quantize", "int8-dynamic-all")
    conv_integer = _results(home, "small")["onnx-int8-dynamic-all"]
    assert conv_integer["status"] == "passed", conv_integer["reasons"]
    assert conv_integer["notes"] and all(n.startswith("kept (--prefer size) although ") for n in conv_integer["notes"])
    assert any("slower than its fp32 parent at batch 1 " in n for n in conv_integer["notes"])
    report = (Home(home).reports_dir("small", 1) / "conversion-1" / "report.md").read_text()
    assert "kept (--prefer size) although" in report
