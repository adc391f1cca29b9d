"""Reproducible bytes: the same registered version gives the same bundle in separate processes.

An SVC converted 8 times gave 3 different bundles (skl2onnx wrote its opset list in hash order), and
ORT-format files differed 1 conversion in 8-10 (ONNX Runtime's serialisation order follows the
child process's memory layout, which moved with the temporary paths and the caller's environment).
Each source kind is converted in three processes with different ``PYTHONHASHSEED`` values.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import textwrap
import types
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest

from bundles.archive import open_bundle
from converter.exporters import ort as ort_exporter
from converter.home import Home
from converter.registry import Registry
from tests.converter.helpers import ok
from tests.converter.recompute import latest
from tests.converter.test_readout_metrics import _encoder

REPO = Path(__file__).resolve().parents[2]
CONVERT_ALL = textwrap.dedent(
    """
    import sys
    from converter.convert import convert
    from converter.home import Home
    from converter.registry import Registry

    registry = Registry(Home.from_env())
    targets = tuple(sys.argv[1].split(","))
    for name in sys.argv[2:]:
        convert(registry, name, None, targets, None)
    """
)
MLP_FACTORY = textwrap.dedent(
    """
    import torch


    def make_model():
        return torch.nn.Sequential(torch.nn.Linear(4, 32), torch.nn.ReLU(), torch.nn.Linear(32, 3))
    """
)


def _register_three_kinds(home: Path, work: Path) -> None:
    import torch
    from sklearn.datasets import load_iris
    from sklearn.svm import SVC

    x, y = load_iris(return_X_y=True)
    x = x.astype(np.float32)
    np.savez(work / "iris.npz", x=x, y=y)
    np.savez(work / "calib.npz", x=x[::3])
    (work / "svc.pkl").write_bytes(pickle.dumps(SVC(probability=True, random_state=0).fit(x, y)))
    ok("register", "svc", "--source", work / "svc.pkl", "--input", "x: float32[-1,4]", "--task", "classification",
       "--eval", work / "iris.npz", "--prefer", "size")  # fmt: skip
    (work / "mlp.py").write_text(MLP_FACTORY)
    torch.manual_seed(1)
    namespace: dict[str, object] = {}
    exec(MLP_FACTORY, namespace)  # noqa: S102
    torch.save(namespace["make_model"]().state_dict(), work / "mlp.pt")  # type: ignore[operator]
    ok("register", "mlp", "--source", f"torch:{work / 'mlp.py'}:make_model", "--weights", work / "mlp.pt", "--input",
       "x: float32[-1,4]", "--task", "classification", "--eval", work / "iris.npz", "--calibration",
       work / "calib.npz", "--prefer", "size", "--max-drop", "1")  # fmt: skip
    ids = np.random.default_rng(4).integers(0, 500, size=(64, 12)).astype(np.int64)
    np.savez(work / "ids.npz", input_ids=ids)
    ok("register", "encoder", "--source", _encoder(work / "encoder.onnx"), "--input", "input_ids: int64[-1,12]",
       "--task", "embedding", "--eval", work / "ids.npz", "--prefer", "size", "--max-drop", "1")  # fmt: skip


def test_every_source_kind_converts_to_the_same_bytes_in_separate_processes_with_other_hash_seeds(
    home: Path, tmp_path: Path
) -> None:
    _register_three_kinds(home, tmp_path)
    names = ("svc", "mlp", "encoder")
    reproducible = ort_exporter._setarch() is not None
    targets = "onnx,ort" if reproducible else "onnx"
    if not reproducible:  # the ORT bytes are then not reproducible, and their manifests say so (test below)
        warnings.warn("this host cannot disable address-space randomisation: ORT bytes left out", stacklevel=1)
    for seed in ("1", "2", "3"):
        env = {**os.environ, "EDGEFLEET_HOME": str(home), "PYTHONHASHSEED": seed,
               "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}  # fmt: skip
        done = subprocess.run([sys.executable, "-c", CONVERT_ALL, targets, *names], env=env, cwd=tmp_path,
                              capture_output=True, text=True, timeout=600, check=False)  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
    registry = Registry(Home(home))
    for name in names:
        conversions = registry.conversions(registry.get(name))
        assert len(conversions) == 3
        assert len({c.bundle_sha256 for c in conversions}) == 1, (name, [c.bundle_sha256 for c in conversions])
        kept = [r for r in conversions[0].results if r["status"] == "passed"]
        assert {r["target"] for r in kept} == set(targets.split(",")), conversions[0].results
        manifest, _ = open_bundle(latest(home, name)[1], tmp_path / f"open-{name}")
        for variant in manifest.variants:
            assert variant.metrics["reproducible"] is (reproducible or variant.target != "ort"), variant.id


def _tiny_onnx(path: Path) -> Path:
    rng = np.random.default_rng(0)
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("MatMul", ["x", "w"], ["h"]), onnx.helper.make_node("Relu", ["h"], ["r"]),
         onnx.helper.make_node("MatMul", ["r", "v"], ["y"])], "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["n", 16])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["n", 4])],
        [onnx.numpy_helper.from_array(rng.normal(size=(16, 64)).astype(np.float32), "w"),
         onnx.numpy_helper.from_array(rng.normal(size=(64, 4)).astype(np.float32), "v")],
    )  # fmt: skip
    onnx.save_model(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)]), str(path))
    return path


@pytest.mark.skipif(ort_exporter._setarch() is None, reason="this host cannot disable address-space randomisation")
def test_ort_bytes_do_not_follow_the_work_path_or_the_callers_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = _tiny_onnx(tmp_path / "tiny.onnx")
    digests = set()
    for index, depth in enumerate((1, 9, 10, 40)):  # 9 -> 10: the path one character longer changed the bytes
        work = tmp_path / ("d" * depth) / str(index)
        work.mkdir(parents=True)
        monkeypatch.setenv("EDGEFLEET_TEST_PADDING", "x" * (index * 1500))
        converted = ort_exporter._converted(types.SimpleNamespace(work_dir=work), "fp32", model)  # type: ignore[arg-type]
        digests.add(converted.read_bytes())
    assert len(digests) == 1


def test_an_ort_variant_says_it_is_not_reproducible_where_randomisation_cannot_be_disabled(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ort_exporter, "_setarch", lambda: None)  # a host without setarch (or forbidding it)
    x = np.random.default_rng(1).normal(size=(40, 16)).astype(np.float32)
    np.savez(tmp_path / "eval.npz", x=x, y=np.zeros(40, dtype=np.int64))
    ok("register", "tiny", "--source", _tiny_onnx(tmp_path / "tiny.onnx"), "--input", "x: float32[-1,16]", "--task",
       "classification", "--eval", tmp_path / "eval.npz")  # fmt: skip
    ok("convert", "tiny", "--targets", "onnx,ort", "--quantize", "fp32")
    manifest, _ = open_bundle(latest(home, "tiny")[1], tmp_path / "open")
    assert {v.id: v.metrics["reproducible"] for v in manifest.variants} == {"onnx-fp32": True, "ort-fp32": False}


CONVERT_SOME = textwrap.dedent(
    """
    import sys
    from converter.convert import convert
    from converter.home import Home
    from converter.registry import Registry

    targets, precisions = tuple(sys.argv[2].split(",")), tuple(sys.argv[3].split(","))
    convert(Registry(Home.from_env()), sys.argv[1], None, targets, precisions)
    """
)


def test_tflite_and_coreml_bytes_are_the_same_in_separate_processes_with_other_hash_seeds(
    home: Path, tmp_path: Path
) -> None:
    """litert-torch keeps module paths in tensor names (a factory imported under a random module name changed
    them); coremltools stamps a date, writes a protobuf map in hash order and random package ids."""
    _register_three_kinds(home, tmp_path)
    for seed in ("4", "5"):
        env = {**os.environ, "EDGEFLEET_HOME": str(home), "PYTHONHASHSEED": seed,
               "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}  # fmt: skip
        command = [sys.executable, "-c", CONVERT_SOME, "mlp", "tflite,coreml", "fp32,int8-weight"]
        done = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600, check=False)
        assert done.returncode == 0, done.stderr[-3000:]
    registry = Registry(Home(home))
    conversions = registry.conversions(registry.get("mlp"))
    assert len({c.bundle_sha256 for c in conversions}) == 1, [c.bundle_sha256 for c in conversions]
    statuses = {r["variant_id"]: r["status"] for r in conversions[0].results}
    assert statuses["tflite-fp32"] == "passed" and statuses["coreml-fp32"] == "structural", statuses
