"""Sources other than the torch factory: scikit-learn through skl2onnx, an ONNX file, an MLP regressor."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import onnx

from bundles.archive import open_bundle
from bundles.predictor import Predictor
from converter.home import Home
from converter.registry import Registry
from tests.converter.helpers import cli, ok


def _latest(home: Path, name: str) -> tuple[dict[str, dict[str, object]], Path]:
    registry = Registry(Home(home))
    model = registry.get(name)
    conversion = registry.latest_conversion(model)
    archive = Home(home).conversion_dir(name, model.version, conversion.number) / conversion.bundle_file
    return {r["variant_id"]: r for r in conversion.results}, archive


def test_random_forest_converts_through_skl2onnx_and_int8_rungs_say_there_is_nothing_to_quantise(
    home: Path, digits_forest: object, tmp_path: Path
) -> None:
    ok("register", "forest", "--source", f"sklearn:{digits_forest.model}", "--input", "x: float32[-1,64]",  # type: ignore[attr-defined]
       "--task", "classification", "--eval", digits_forest.eval, "--max-latency-ratio", "5")  # type: ignore[attr-defined]  # fmt: skip
    ok("convert", "forest", "--targets", "onnx", "--quantize", "auto")
    results, archive = _latest(home, "forest")
    fp32 = results["onnx-fp32"]
    assert fp32["status"] == "passed" and fp32["metrics"]["max_abs_error"] < 1e-5
    assert fp32["metrics"]["top1_agreement"] == 1.0
    assert "nothing to quantise" in results["onnx-int8-dynamic"]["reasons"][0]
    manifest, bundle_dir = open_bundle(archive, tmp_path / "forest")
    assert {t.name for t in manifest.outputs} == {"label", "probabilities"}
    output = manifest.drift_baseline.output  # the predicted classes as a device sees them: the label output
    assert output is not None and output.name == "label" and output.categories == tuple(str(i) for i in range(10))
    assert manifest.readout is not None and manifest.readout.output == "probabilities"
    assert len(manifest.features) == 64 and manifest.features[3].name == "x_3"
    with Predictor.load(manifest, bundle_dir, variant="onnx-fp32") as predictor:
        assert predictor.self_test().passed
    report = (Home(home).reports_dir("forest", 1) / "conversion-1" / "report.md").read_text()
    section = report.split("## Refused before measurement", 1)[1]
    for rung in ("onnx-int8-static", "onnx-int8-dynamic"):
        assert f"- {rung}: nothing to quantise" in section


def test_mlp_regressor_with_parquet_eval_data_is_gated_on_mae(home: Path, diabetes_mlp: object, tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = np.load(diabetes_mlp.eval)  # type: ignore[attr-defined]
    columns = {name: data["x"][:, i] for i, name in enumerate(["age", "sex", "bmi", "bp", "s1", "s2", "s3", "s4",
                                                                "s5", "s6"])}  # fmt: skip
    pq.write_table(pa.table({**columns, "y": data["y"]}), tmp_path / "eval.parquet")
    ok("register", "diabetes", "--source", f"sklearn:{diabetes_mlp.model}", "--input", "x: float32[-1,10]",  # type: ignore[attr-defined]
       "--task", "regression", "--metric", "mae", "--max-drop", "0.05", "--max-latency-ratio", "5",
       "--eval", tmp_path / "eval.parquet", "--calibration", Path(diabetes_mlp.eval).with_name("calib.npz"))  # type: ignore[attr-defined]  # fmt: skip
    ok("convert", "diabetes", "--targets", "onnx,ort", "--quantize", "fp32,int8-dynamic")
    results, archive = _latest(home, "diabetes")
    fp32 = results["onnx-fp32"]["metrics"]
    assert fp32["metric"] == "mae" and 0.0 < fp32["metric_value"] < 1.0
    assert abs(fp32["metric_drop"]) < 1e-4
    manifest, _ = open_bundle(archive, tmp_path / "mlp")
    assert manifest.outputs[0].name == "variable" and manifest.task == "regression"
    assert manifest.drift_baseline.output is not None and manifest.drift_baseline.output.edges
    assert [f.name for f in manifest.features][:3] == ["age", "sex", "bmi"]
    assert {h.name for h in manifest.drift_baseline.features} >= {"age", "bmi"}


def test_a_saved_exported_program_is_a_torch_source(home: Path, tmp_path: Path) -> None:
    import torch

    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)).eval()
    x = np.random.default_rng(2).normal(size=(40, 6)).astype(np.float32)
    batch = torch.export.Dim("batch", min=1, max=16)
    program = torch.export.export(model, (torch.from_numpy(x[:2]),), dynamic_shapes=({0: batch},))
    torch.export.save(program, str(tmp_path / "model.pt2"))
    with torch.no_grad():
        labels = model(torch.from_numpy(x)).argmax(1).numpy()
    np.savez(tmp_path / "eval.npz", x=x, y=labels)
    ok("register", "mlp", "--source", tmp_path / "model.pt2", "--input", "x: float32[1..16,6]",
       "--task", "classification", "--eval", tmp_path / "eval.npz")  # fmt: skip
    ok("convert", "mlp", "--targets", "onnx", "--quantize", "fp32")
    results, _ = _latest(home, "mlp")
    assert results["onnx-fp32"]["metrics"]["metric_value"] == 1.0
    assert set(results["onnx-fp32"]["metrics"]["dynamic_extremes"]) == {"x[0]=1", "x[0]=16"}


def test_an_onnx_file_is_a_source_and_its_external_data_is_folded_in(home: Path, tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    weights = rng.normal(size=(16, 4)).astype(np.float32)
    x = rng.normal(size=(200, 16)).astype(np.float32)
    labels = np.argmax(x @ weights, axis=1)
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("MatMul", ["x", "w"], ["scores"])], "linear",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", 16])],
        [onnx.helper.make_tensor_value_info("scores", onnx.TensorProto.FLOAT, ["batch", 4])],
        [onnx.numpy_helper.from_array(weights, "w")],
    )  # fmt: skip
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    path = tmp_path / "linear.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, size_threshold=0, location="linear.onnx.data")
    np.savez(tmp_path / "eval.npz", x=x, y=labels)
    ok("register", "linear", "--source", path, "--input", "x: float32[1..16,16]", "--task", "classification",
       "--eval", tmp_path / "eval.npz", "--max-latency-ratio", "5")  # fmt: skip
    stored = Home(home).artifacts_dir("linear", 1) / "source" / "model.onnx"
    assert not list(stored.parent.glob("*.data")) and stored.stat().st_size > weights.nbytes
    ok("convert", "linear", "--targets", "onnx", "--quantize", "fp32,fp16")
    results, _ = _latest(home, "linear")
    assert results["onnx-fp32"]["metrics"]["metric_value"] == 1.0
    assert set(results["onnx-fp32"]["metrics"]["dynamic_extremes"]) == {"x[0]=1", "x[0]=16"}


def test_hist_gradient_boosting_is_refused_at_registration_with_one_clear_line(home: Path, tmp_path: Path) -> None:
    from sklearn.ensemble import HistGradientBoostingClassifier

    rng = np.random.default_rng(0)
    x = rng.normal(size=(120, 5)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64)
    (tmp_path / "hgb.pkl").write_bytes(pickle.dumps(HistGradientBoostingClassifier(max_iter=5).fit(x, y)))
    np.savez(tmp_path / "eval.npz", x=x, y=y)
    code, out, err = cli("register", "hgb", "--source", f"sklearn:{tmp_path / 'hgb.pkl'}", "--input",
                         "x: float32[-1,5]", "--task", "classification", "--eval", tmp_path / "eval.npz")  # fmt: skip
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: model hgb (new version), variant source: skl2onnx ")
    assert "cannot convert HistGradientBoostingClassifier (scikit-learn " in lines[0]
    assert lines[0].endswith("TypeError: Field onnx.AttributeProto.ints: Expected an int, got a boolean.")
    assert "Traceback" not in out + err
    assert Registry(Home(home)).versions() == []
    assert not (home / "artifacts").exists()  # no empty folders either
