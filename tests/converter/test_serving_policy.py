"""The serving policy flags of ``register``: kept with the version (the manifest: test_digits_cnn), bad ones refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from converter.home import Home
from converter.registry import Registry
from tests.converter.helpers import cli, ok
from tests.converter.test_bad_input import _linear_onnx, _nothing_registered, _one_line_error, _register_args


@pytest.fixture()
def eval4(tmp_path: Path) -> Path:
    np.savez(tmp_path / "eval.npz", x=np.random.default_rng(0).normal(size=(40, 4)).astype(np.float32),
             y=np.zeros(40, dtype=np.int64))  # fmt: skip
    return tmp_path / "eval.npz"


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--confidence-threshold", "1.5"], "--confidence-threshold must be in (0, 1]"),
        (["--deadline-ms", "0"], "--deadline-ms must be greater than 0"),
        (["--static-answer", "[1, 2]"], "--static-answer"),
        (["--static-answer", "missing.json"], "--static-answer"),
    ],
)
def test_a_bad_serving_flag_is_one_line_and_registers_nothing(
    home: Path, tmp_path: Path, eval4: Path, flags: list[str], message: str
) -> None:
    args = [*_register_args("tiny", _linear_onnx(tmp_path / "m.onnx"), eval4), *flags]
    assert message in _one_line_error(*cli(*args))
    _nothing_registered(home)


def test_the_serving_policy_is_kept_with_the_registered_version(home: Path, tmp_path: Path, eval4: Path) -> None:
    static = tmp_path / "static.json"
    static.write_text(json.dumps({"scores": [[0.0, 0.0, 1.0]]}))
    ok(*_register_args("tiny", _linear_onnx(tmp_path / "m.onnx"), eval4), "--deadline-ms", "25",
       "--confidence-threshold", "0.7", "--static-answer", str(static))  # fmt: skip
    policy = Registry(Home(home)).get("tiny").spec.serving
    assert (policy.deadline_ms, policy.confidence_threshold) == (25.0, 0.7)
    assert policy.static_answer == {"scores": [[0.0, 0.0, 1.0]]}
