"""Target reach is explicit: a source a target cannot take, or an operator its converter cannot lower,
is refused for that target with the converter's reason while the other targets go on; and a runtime
whose environment is missing validates nothing, saying why."""

from __future__ import annotations

import json
import pickle
import textwrap
from pathlib import Path
from typing import Any

import numpy as np

from bundles.archive import open_bundle
from bundles.manifest import Manifest
from converter.home import Home
from converter.registry import Registry
from tests.converter.helpers import cli, ok, register_cnn
from tests.converter.recompute import latest

DET_FACTORY = textwrap.dedent(
    """
    import torch


    class DetNet(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.mix = torch.nn.Linear(9, 9)
            self.head = torch.nn.Linear(2, 1)

        def forward(self, x):
            matrices = self.mix(x).reshape(-1, 3, 3)
            return self.head(torch.stack([torch.linalg.det(matrices), x.sum(1)], 1))


    def make_model():
        return DetNet()
    """
)


def _manifest(home: Path, name: str, tmp_path: Path) -> Manifest:
    _, archive = latest(home, name)
    manifest, _ = open_bundle(archive, tmp_path / f"unpacked-{name}")
    return manifest


def _results(home: Path, name: str) -> dict[str, dict[str, Any]]:
    registry = Registry(Home(home))
    conversion = registry.latest_conversion(registry.get(name))
    return {r["variant_id"]: r for r in conversion.results}


def test_a_model_litert_torch_cannot_lower_is_refused_for_tflite_while_onnx_goes_on(home: Path, tmp_path: Path) -> None:
    (tmp_path / "det.py").write_text(DET_FACTORY)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 9)).astype(np.float32)
    np.savez(tmp_path / "eval.npz", x=x, y=rng.normal(size=(64, 1)).astype(np.float32))
    ok("register", "det", "--source", f"torch:{tmp_path / 'det.py'}:make_model", "--random-init",
       "--input", "x: float32[-1,9]", "--task", "regression", "--eval", tmp_path / "eval.npz")  # fmt: skip
    ok("convert", "det", "--targets", "onnx,tflite", "--quantize", "fp32")
    results = _results(home, "det")
    assert results["onnx-fp32"]["status"] == "passed"
    refused = results["tflite-fp32"]
    assert refused["status"] == "refused"
    assert refused["reasons"] == [
        "litert-torch cannot lower the model: RuntimeError: Lowering not found: aten._linalg_det.default"
    ], refused["reasons"]
    report = (home / "reports" / "det" / "1" / "conversion-1" / "report.md").read_text()
    assert "| tflite-fp32 | refused | - |" in report and "aten._linalg_det.default" in report
    manifest = _manifest(home, "det", tmp_path)
    assert [v.id for v in manifest.variants] == ["onnx-fp32"]


def test_a_scikit_learn_pipeline_cannot_reach_tflite_or_coreml_and_onnx_goes_on(home: Path, tmp_path: Path) -> None:
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x, y = load_digits(return_X_y=True)
    x = x.astype(np.float32)
    pipeline = make_pipeline(StandardScaler(), LogisticRegression(max_iter=200)).fit(x[:1000], y[:1000])
    (tmp_path / "pipe.pkl").write_bytes(pickle.dumps(pipeline))
    np.savez(tmp_path / "eval.npz", x=x[1000:1200], y=y[1000:1200])
    ok("register", "pipe", "--source", tmp_path / "pipe.pkl", "--input", "x: float32[-1,64]",
       "--task", "classification", "--eval", tmp_path / "eval.npz")  # fmt: skip
    ok("convert", "pipe", "--targets", "onnx,tflite,coreml", "--quantize", "fp32")
    results = _results(home, "pipe")
    assert results["onnx-fp32"]["status"] == "passed"
    for target in ("tflite", "coreml"):
        assert results[f"{target}-fp32"]["reasons"] == [
            f"a sklearn source cannot reach {target}: its converter takes PyTorch modules only "
            "(the onnx and ort targets take every source)"
        ]
    code, _, err = cli("convert", "pipe", "--targets", "tflite")
    assert code == 1
    assert err.strip() == (
        "error: model pipe@1, variant tflite-fp32: a sklearn source cannot reach tflite: its converter takes "
        "PyTorch modules only (the onnx and ort targets take every source)"
    )


def test_without_a_tflite_runtime_environment_variants_are_validated_on_litert_only_saying_why(
    home: Path, digits_cnn: object, tmp_path: Path, monkeypatch: Any
) -> None:
    monkeypatch.setenv("EDGEFLEET_TFLITE_RUNTIME_PYTHON", str(tmp_path / "nowhere" / "python"))
    register_cnn("cnn", digits_cnn, "--prefer", "size")
    ok("convert", "cnn", "--targets", "tflite", "--quantize", "fp32,int8-weight")
    results = _results(home, "cnn")
    for precision in ("fp32", "int8-weight"):
        result = results[f"tflite-{precision}"]
        assert result["status"] == "passed"
        old = result["runtimes"]["tflite_runtime"]
        assert old["status"] == "unavailable" and old["version"] == ""
        assert f"EDGEFLEET_TFLITE_RUNTIME_PYTHON={tmp_path / 'nowhere' / 'python'} does not exist" in old["reasons"][0]
        assert any(note.startswith("not validated on tflite_runtime: no tflite_runtime environment")
                   for note in result["notes"])  # fmt: skip
    manifest = _manifest(home, "cnn", tmp_path)
    assert {tuple(v.runtime for v in variant.requirements.validated_runtimes) for variant in manifest.variants} == {
        ("litert",)
    }
    saved = json.loads(next((home / "artifacts" / "cnn" / "1" / "conversions").glob("*/results.json")).read_text())
    assert all(not row["label"].endswith("@tflite_runtime") for row in saved["agreement"]["vs_source"])
