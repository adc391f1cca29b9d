"""The digits CNN end to end: register, convert (onnx + ort, the whole ladder), bundle, report, publish."""

from __future__ import annotations

import json
import re
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from bundles.archive import open_bundle
from bundles.canonical import sha256_file
from bundles.manifest import Manifest
from bundles.predictor import Predictor
from bundles.tuf.client import TufClient
from bundles.tuf.testing import FileServer
from converter.home import Home
from converter.registry import Registry
from tests.converter.helpers import cli, ok, register_cnn

LABELS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
POSTPROCESS = [
    {"op": "softmax", "tensor": "logits", "output": "probabilities"},
    {"op": "argmax", "tensor": "probabilities", "output": "class_index"},
    {"op": "label_map", "tensor": "class_index", "output": "label", "labels": list(LABELS)},
]


@pytest.fixture(scope="module")
def converted(digits_cnn: object, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One home with digits@1 registered and converted once (auto ladder, onnx + ort)."""
    root = tmp_path_factory.mktemp("home-digits")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("EDGEFLEET_HOME", str(root))
        # The host is shared with other test runs: a generous speed allowance keeps this module's verdicts
        # (and so its bundle bytes) stable; refusing a slower variant is tested with ConvInteger elsewhere.
        labels = root / "labels.txt"
        labels.write_text("\n".join(LABELS) + "\n")
        steps = root / "post.json"
        steps.write_text(json.dumps(POSTPROCESS))
        register_cnn("digits", digits_cnn, "--max-latency-ratio", "3", "--labels", labels, "--postprocess", steps,
                     "--deadline-ms", "40", "--confidence-threshold", "0.6",
                     "--static-answer", json.dumps({"label": ["unknown"]}))  # fmt: skip
        ok("convert", "digits", "--targets", "onnx,ort", "--quantize", "auto")
        yield root


@pytest.fixture()
def in_home(converted: Path, monkeypatch: pytest.MonkeyPatch) -> Home:
    monkeypatch.setenv("EDGEFLEET_HOME", str(converted))
    return Home(converted)


def _results(home: Home) -> dict[str, dict[str, object]]:
    registry = Registry(home)
    conversion = registry.latest_conversion(registry.get("digits"))
    return {r["variant_id"]: r for r in conversion.results}


def _bundle(home: Home, tmp_path: Path) -> tuple[Manifest, Path]:
    registry = Registry(home)
    model = registry.get("digits")
    conversion = registry.latest_conversion(model)
    archive = home.conversion_dir("digits", 1, conversion.number) / conversion.bundle_file
    return open_bundle(archive, tmp_path / "unpacked")


def test_every_rung_of_the_ladder_is_measured_for_both_targets(in_home: Home) -> None:
    results = _results(in_home)
    for target in ("onnx", "ort"):
        for precision in ("fp32", "fp16", "int8-dynamic", "int8-static"):
            rung = results[f"{target}-{precision}"]
            assert rung["status"] in ("passed", "refused")
            assert rung["status"] == "passed" or rung["reasons"], rung
    fp32 = results["onnx-fp32"]["metrics"]
    assert fp32["metric_value"] > 0.9
    assert fp32["max_abs_error"] < 1e-3
    for key in ("latency_b1_p50_ms", "latency_b1_p95_ms", "latency_batch_p50_ms", "peak_rss_delta_bytes"):
        assert fp32[key] >= 0


def test_static_int8_keeps_the_last_layer_float_and_stays_accurate(in_home: Home) -> None:
    static = _results(in_home)["onnx-int8-static"]
    assert static["status"] == "passed", static["reasons"]
    metrics = static["metrics"]
    assert metrics["metric_drop"] <= 0.01
    assert metrics["size_ratio_to_fp32"] < 0.35
    assert metrics["top1_agreement"] > 0.99
    assert metrics["preferred"] is True


def test_dynamic_batch_is_validated_at_both_ends_of_its_range(in_home: Home) -> None:
    extremes = _results(in_home)["onnx-fp32"]["metrics"]["dynamic_extremes"]
    assert set(extremes) == {"x[0]=1", "x[0]=32"}
    assert max(extremes.values()) < 1e-3


def test_bundle_holds_passing_variants_that_pass_their_own_golden_self_test(in_home: Home, tmp_path: Path) -> None:
    manifest, bundle_dir = _bundle(in_home, tmp_path)
    results = _results(in_home)
    passing = sorted(v for v, r in results.items() if r["status"] == "passed")
    assert sorted(v.id for v in manifest.variants) == passing
    assert manifest.created_at == Registry(in_home).get("digits").created_at
    assert len(manifest.golden.cases) == 8
    serving = manifest.runtime_config  # the registration flags, as every device reads them
    assert (serving.deadline_ms, serving.confidence_threshold) == (40.0, 0.6)
    assert serving.static_answer == {"label": ["unknown"]}
    for variant in manifest.variants:
        assert variant.metrics["metric_drop"] <= 0.01
        assert "latency_b1_p50_ms" not in variant.metrics  # timings stay out of the signed, reproducible bytes
        with Predictor.load(manifest, bundle_dir, variant=variant.id) as predictor:
            report = predictor.self_test()
            assert report.passed, report.to_dict()
            case = manifest.golden.cases[0]
            x = np.asarray(case.inputs["x"].data, dtype=np.float32).reshape(case.inputs["x"].shape)
            expected = LABELS[int(np.argmax(case.expected["logits"].data))]
            assert predictor.predict({"x": x}).outputs["label"].tolist() == [expected]


def test_golden_expected_outputs_are_the_source_model_outputs(
    in_home: Home, tmp_path: Path, digits_cnn: object
) -> None:
    import torch

    from tests.converter.conftest import CNN_FACTORY

    manifest, _ = _bundle(in_home, tmp_path)
    namespace: dict[str, object] = {}
    exec(CNN_FACTORY, namespace)
    model = namespace["make_model"]()
    model.load_state_dict(torch.load(digits_cnn.weights))  # type: ignore[attr-defined]
    model.eval()
    case = manifest.golden.cases[0]
    x = np.asarray(case.inputs["x"].data, dtype=np.float32).reshape(case.inputs["x"].shape)
    expected = np.asarray(case.expected["logits"].data, dtype=np.float32)
    with torch.no_grad():
        source = model(torch.from_numpy(x)).numpy().reshape(-1)
    np.testing.assert_allclose(expected, source, atol=1e-5)
    assert manifest.golden.variant_tolerances["onnx-int8-static"]["atol"] > manifest.golden.atol


def test_drift_baseline_has_image_summaries_and_the_predicted_class_distribution(in_home: Home, tmp_path: Path) -> None:
    manifest, _ = _bundle(in_home, tmp_path)
    names = {h.name for h in manifest.drift_baseline.features}
    assert {"x.mean", "x.std"} <= names
    output = manifest.drift_baseline.output
    assert output is not None and output.name == "logits"
    assert output.categories == LABELS
    assert abs(sum(output.freqs) - 1.0) < 1e-4
    assert manifest.lineage.source_sha256 == Registry(in_home).get("digits").source_sha256
    assert manifest.lineage.tool_versions["onnxruntime"]


def test_converting_the_same_version_again_gives_identical_bundle_bytes(in_home: Home) -> None:
    first = _results_bundle_sha(in_home)
    ok("convert", "digits", "--targets", "onnx,ort", "--quantize", "auto")
    registry = Registry(in_home)
    conversions = registry.conversions(registry.get("digits"))
    assert len(conversions) >= 2
    assert conversions[-1].bundle_sha256 == first
    archive = in_home.conversion_dir("digits", 1, conversions[-1].number) / conversions[-1].bundle_file
    assert sha256_file(archive) == first


def _results_bundle_sha(home: Home) -> str:
    registry = Registry(home)
    return registry.conversions(registry.get("digits"))[0].bundle_sha256


def test_report_writes_markdown_html_and_plot(in_home: Home) -> None:
    assert "no conversion 99" in cli("report", "digits", "--conversion", "99")[2]
    out = ok("report", "digits", "--conversion", "1")
    html_path = Path(out.strip().splitlines()[-1].split(" ", 1)[1])
    folder = html_path.parent
    assert (folder / "plot.png").read_bytes()[:4] == b"\x89PNG"
    report = (folder / "report.md").read_text()
    assert "onnx-int8-static" in report and "| accuracy |" in report  # higher is better: no "lower is better"
    assert re.search(r"\| \d+\.\d+ \(\d+\.\d+-\d+\.\d+\) \|", report)  # latency median (range of round medians)
    assert "data:image/png;base64," in html_path.read_text()


def test_every_plot_panel_draws_its_budget(in_home: Home) -> None:
    import matplotlib.pyplot as plt

    from converter.report import plot_figure

    registry = Registry(in_home)
    model = registry.get("digits")
    figure = plot_figure(registry.latest_conversion(model).results, model.spec)
    try:
        for axis in figure.axes:
            labels = [text.get_text() for text in axis.get_legend().get_texts()]
            assert any(label.startswith(("budget", "fp32 parent")) for label in labels), (axis.get_title(), labels)
        source = registry.latest_conversion(model).results[0]["metrics"]["source_metric_value"]
        metric_lines = [line.get_ydata()[0] for line in figure.axes[1].get_lines()]
        assert source - 0.01 in [pytest.approx(y) for y in metric_lines]  # the least accuracy the budget allows
    finally:
        plt.close(figure)


def test_list_show_and_history_describe_the_registered_model(in_home: Home) -> None:
    assert "digits" in ok("list")
    shown = ok("show", "digits@1")
    assert "x: float32[1..32,1,8,8]" in shown and "max_drop=0.01" in shown
    assert "digits" in ok("history", "digits")


def test_registered_versions_are_immutable_in_the_database(in_home: Home) -> None:
    with sqlite3.connect(in_home.root / "registry.db") as db, pytest.raises(sqlite3.IntegrityError, match="immutable"):
        db.execute("UPDATE model_versions SET source_sha256 = 'x'")


def test_publish_to_a_local_repository_gives_metadata_a_tuf_client_verifies(in_home: Home, tmp_path: Path) -> None:
    code, _, err = cli("publish", "digits", "--repo", tmp_path / "repo")
    assert code != 0 and "keys init" in err  # no release key yet
    ok("keys", "init")
    assert (in_home.keys_dir / "targets.key").stat().st_mode & 0o077 == 0
    out = ok("publish", "digits", "--repo", tmp_path / "repo", "--yes")
    assert "digits/1/manifest.json" in out
    root = (tmp_path / "repo" / "metadata" / "1.root.json").read_bytes()
    with FileServer.for_repository(tmp_path / "repo") as server:
        urls = (server.url("/tuf/metadata/"), server.url("/tuf/targets/"))
        with TufClient(tmp_path / "dev" / "m", tmp_path / "dev" / "t", *urls, trusted_root=root) as client:
            client.refresh()
            manifest = Manifest.from_bytes(client.download("digits/1/manifest.json").read_bytes())
            archive = client.download(f"digits/1/{manifest.variants[0].id}.tar.gz")
            assert archive.stat().st_size > 1000
    assert manifest.name == "digits" and manifest.version == 1
    assert json.loads(root)["signed"]["_type"] == "root"
    assert str((tmp_path / "repo").resolve()) in ok("history", "digits")
