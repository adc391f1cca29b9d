"""Bad input ends with one line naming the model, the variant and the cause, a non-zero exit, and no trace."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest

from converter.home import Home
from converter.registry import Registry
from tests.converter.helpers import cli, ok, register_cnn


def _one_line_error(code: int, out: str, err: str, expected_code: int | None = None) -> str:
    assert code != 0
    if expected_code is not None:
        assert code == expected_code, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in out + err
    return lines[0]


def _nothing_registered(home: Path) -> None:
    assert Registry(Home(home)).versions() == []
    artifacts = home / "artifacts"
    assert not artifacts.exists() or [p for p in artifacts.rglob("*") if p.is_file()] == []


def _register_args(name: str, model: Path, eval_path: Path, spec: str = "x: float32[-1,4]") -> list[str | Path]:
    return ["register", name, "--source", f"onnx:{model}", "--input", spec, "--task", "classification",
            "--eval", eval_path]  # fmt: skip


def _linear_onnx(path: Path, inputs: int = 4, op: str = "MatMul", domain: str = "") -> Path:
    weights = np.ones((inputs, 3), dtype=np.float32)
    node = onnx.helper.make_node(op, ["x", "w"], ["scores"], domain=domain)
    graph = onnx.helper.make_graph(
        [node], "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["n", inputs])],
        [onnx.helper.make_tensor_value_info("scores", onnx.TensorProto.FLOAT, ["n", 3])],
        [onnx.numpy_helper.from_array(weights, "w")],
    )  # fmt: skip
    opsets = [onnx.helper.make_opsetid("", 17)] + ([onnx.helper.make_opsetid(domain, 1)] if domain else [])
    onnx.save_model(onnx.helper.make_model(graph, opset_imports=opsets), str(path))
    return path


@pytest.fixture()
def eval4(tmp_path: Path) -> Path:
    np.savez(tmp_path / "eval.npz", x=np.random.default_rng(0).normal(size=(40, 4)).astype(np.float32),
             y=np.zeros(40, dtype=np.int64))  # fmt: skip
    return tmp_path / "eval.npz"


def test_a_malformed_eval_file_is_one_line_and_registers_nothing(home: Path, tmp_path: Path) -> None:
    bad = tmp_path / "eval.npz"
    bad.write_bytes(b"PK\x03\x04 this is not a zip archive")
    line = _one_line_error(*cli(*_register_args("tiny", _linear_onnx(tmp_path / "m.onnx"), bad)), expected_code=2)
    assert line.startswith("error: model tiny (new version), variant source: eval file eval.npz is not a readable")
    _nothing_registered(home)


def test_a_missing_eval_file_is_one_line(home: Path, tmp_path: Path) -> None:
    line = _one_line_error(*cli(*_register_args("tiny", _linear_onnx(tmp_path / "m.onnx"), tmp_path / "nope.npz")))
    assert "eval file" in line and "does not exist" in line
    _nothing_registered(home)


def test_eval_data_that_contradicts_the_declared_shape_is_refused(home: Path, tmp_path: Path, eval4: Path) -> None:
    model = _linear_onnx(tmp_path / "m.onnx")
    line = _one_line_error(*cli(*_register_args("tiny", model, eval4, spec="x: float32[-1,1,2,2]")), expected_code=2)
    assert "input 'x' has rows of shape [4], but the spec declares [-1, 1, 2, 2]" in line
    _nothing_registered(home)


def test_a_model_that_contradicts_the_declared_shape_is_refused(home: Path, tmp_path: Path) -> None:
    model = _linear_onnx(tmp_path / "m.onnx", inputs=8)
    np.savez(tmp_path / "eval.npz", x=np.zeros((10, 4), dtype=np.float32), y=np.zeros(10, dtype=np.int64))
    line = _one_line_error(*cli(*_register_args("tiny", model, tmp_path / "eval.npz")), expected_code=2)
    assert line.startswith("error: model tiny (new version), variant source: ")
    assert "input 'x' has shape [-1, 8] in the model, the spec declares [-1, 4]" in line
    _nothing_registered(home)


def test_an_unsupported_operator_is_named(home: Path, tmp_path: Path, eval4: Path) -> None:
    model = _linear_onnx(tmp_path / "m.onnx", op="FancyMatMul", domain="com.example")
    line = _one_line_error(*cli(*_register_args("fancy", model, eval4)), expected_code=1)
    assert "unsupported operator" in line and "FancyMatMul" in line
    _nothing_registered(home)


def test_a_model_whose_export_does_not_match_the_source_is_refused(home: Path, tmp_path: Path) -> None:
    factory = tmp_path / "noisy.py"
    factory.write_text(textwrap.dedent('''
        import torch

        class Noisy(torch.nn.Module):
            def forward(self, x):
                return x.flatten(1) + torch.rand(x.shape[0], 4)

        def make_model():
            return Noisy()
    '''))  # fmt: skip
    np.savez(tmp_path / "eval.npz", x=np.zeros((20, 4), dtype=np.float32), y=np.zeros(20, dtype=np.int64))
    ok("register", "noisy", "--source", f"torch:{factory}:make_model", "--random-init", "--input", "x: float32[-1,4]",
       "--task", "classification", "--eval", tmp_path / "eval.npz")  # fmt: skip
    line = _one_line_error(*cli("convert", "noisy", "--targets", "onnx"), expected_code=3)
    assert line.startswith("error: model noisy@1, variant onnx-fp32: fp32 outputs differ from the source by")
    registry = Registry(Home(home))
    assert registry.conversions(registry.get("noisy")) == []


def test_gguf_of_a_model_that_is_no_language_model_says_what_it_is_for(home: Path) -> None:
    line = _one_line_error(*cli("convert", "digits", "--targets", "onnx,gguf"), expected_code=2)
    assert line == (
        "error: target 'gguf' is for language models (register one with 'edgefleet-convert register-llm'); "
        "this model's targets: onnx, ort, tflite, coreml"
    )


def test_unknown_models_and_options_are_one_line(home: Path, digits_cnn: object) -> None:
    assert "not registered" in _one_line_error(*cli("convert", "nobody"), expected_code=2)
    assert "--quantize" in _one_line_error(*cli("convert", "nobody", "--quantize", "int3"), expected_code=2)
    register_cnn("digits", digits_cnn)
    assert "no conversion yet" in _one_line_error(*cli("publish", "digits", "--repo", home / "r"), expected_code=2)


def test_the_metric_and_form_tables_in_the_docs_are_the_code_s() -> None:
    from converter.metrics import forms_markdown_table, markdown_table

    docs = (Path(__file__).resolve().parents[2] / "docs" / "converter.md").read_text()
    assert markdown_table() in docs
    assert forms_markdown_table() in docs


def test_documented_exit_codes_are_the_cli_s(home: Path) -> None:
    """The table in docs/converter.md: 2 bad input, 3 a gate refused, 1 anything else (each example has a test)."""
    docs = (Path(__file__).resolve().parents[2] / "docs" / "converter.md").read_text()
    rows = [line for line in docs.split("## Errors", 1)[1].split("##", 1)[0].splitlines() if line.startswith("| ")]
    codes = {row.split("|")[1].strip() for row in rows[1:]}
    assert codes == {"1", "2", "3"}
    assert _one_line_error(*cli("convert", "nobody", "--targets", "onnx"), expected_code=2)
