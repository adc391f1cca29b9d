"""Declarative pre/post-processing: each op against numpy, chaining, batching and clear errors."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from bundles.errors import InferenceError, InputError, ManifestError
from bundles.manifest import Step
from bundles.processing import apply_steps, compile_steps

RNG = np.random.default_rng(7)
BATCH = RNG.normal(size=(5, 4)).astype(np.float32)
IMAGES = RNG.integers(0, 255, size=(2, 8, 8, 3)).astype(np.uint8)


def run(op: str, x: np.ndarray, stage: str = "post", **params: Any) -> dict[str, np.ndarray]:
    return apply_steps([Step(op, params)], {"t": x}, stage)


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


OPS = [
    ("cast", BATCH, {"dtype": "float16"}, BATCH.astype(np.float16)),
    ("reshape", BATCH, {"shape": [-1, 2, 2]}, BATCH.reshape(5, 2, 2)),
    ("scale", IMAGES, {"factor": 1 / 255}, IMAGES * np.float32(1 / 255)),
    ("scale with offset", BATCH, {"factor": 2.0, "offset": -1.0}, BATCH * 2 - 1),
    ("scale per channel", BATCH, {"factor": [1, 2, 3, 4]}, BATCH * np.array([1, 2, 3, 4], np.float32)),
    (
        "normalize channels last",
        IMAGES.astype(np.float32),
        {"mean": [1.0, 2.0, 3.0], "std": [2.0, 4.0, 8.0]},
        (IMAGES - np.array([1, 2, 3], np.float32)) / np.array([2, 4, 8], np.float32),
    ),
    (
        "normalize channels first",
        np.moveaxis(IMAGES, -1, 1).astype(np.float32),
        {"mean": [1.0, 2.0, 3.0], "std": [2.0, 4.0, 8.0], "axis": 1},
        (np.moveaxis(IMAGES, -1, 1) - np.array([1, 2, 3], np.float32).reshape(1, 3, 1, 1))
        / np.array([2, 4, 8], np.float32).reshape(1, 3, 1, 1),
    ),
    ("clip", BATCH, {"min": -0.5, "max": 0.5}, np.clip(BATCH, -0.5, 0.5)),
    ("clip below only", BATCH, {"min": 0}, np.maximum(BATCH, 0)),
    ("softmax", BATCH, {}, softmax(BATCH)),
    ("softmax large logits", BATCH * 1000, {}, softmax(BATCH * 1000)),
    ("softmax one row", BATCH[:1] * 1000, {}, softmax(BATCH[:1] * 1000)),
    ("softmax integer logits", BATCH.astype(np.int64), {}, softmax(BATCH.astype(np.int64))),
    ("softmax axis 0", BATCH, {"axis": 0}, softmax(BATCH.T).T),
    ("argmax", BATCH, {}, BATCH.argmax(axis=-1)),
    ("argmax axis 0", BATCH, {"axis": 0}, BATCH.argmax(axis=0)),
    ("transpose", IMAGES, {"perm": [0, 3, 1, 2]}, IMAGES.transpose(0, 3, 1, 2)),
    ("expand_dims", BATCH, {"axis": 1}, BATCH[:, None, :]),
]


@pytest.mark.parametrize(("case", "x", "params", "expected"), OPS, ids=[o[0] for o in OPS])
def test_op_matches_numpy_on_a_batch(case: str, x: np.ndarray, params: dict[str, Any], expected: np.ndarray) -> None:
    got = run(case.split()[0], x, **params)["t"]
    assert got.shape == expected.shape
    assert got.dtype == expected.dtype or np.issubdtype(got.dtype, np.floating)
    np.testing.assert_allclose(got.astype(np.float64), expected.astype(np.float64), rtol=1e-6, atol=1e-6)


def test_scale_keeps_float32_inputs_float32() -> None:
    assert run("scale", BATCH, factor=0.5)["t"].dtype == np.float32
    assert run("normalize", BATCH, mean=[0.0], std=[2.0])["t"].dtype == np.float32


def test_topk_gives_sorted_indices_and_scores() -> None:
    out = run("topk", BATCH, k=2, output="top")
    expected = np.argsort(-BATCH, axis=-1)[:, :2]
    np.testing.assert_array_equal(out["top"], expected)
    np.testing.assert_array_equal(out["top_scores"], np.take_along_axis(BATCH, expected, axis=-1))
    assert "t" in out  # the source tensor is kept when the step writes elsewhere


def test_label_map_turns_indices_into_labels_keeping_shape() -> None:
    out = run("label_map", np.array([[2, 0], [1, 1]]), labels=["cat", "dog", "eel"])
    assert out["t"].tolist() == [["eel", "cat"], ["dog", "dog"]]


def test_steps_chain_through_their_outputs_by_default() -> None:
    steps = [
        Step("softmax", {"output": "probabilities"}),
        Step("argmax", {"output": "class_index"}),
        Step("label_map", {"labels": ["a", "b", "c", "d"], "output": "label"}),
    ]
    out = apply_steps(steps, {"logits": BATCH}, "post")
    assert set(out) == {"logits", "probabilities", "class_index", "label"}
    np.testing.assert_allclose(out["probabilities"], softmax(BATCH), rtol=1e-6)
    assert out["label"].tolist() == [["a", "b", "c", "d"][i] for i in BATCH.argmax(axis=-1)]


def test_pre_processing_turns_raw_pixels_into_the_model_input() -> None:
    steps = [
        Step("cast", {"dtype": "float32"}),
        Step("scale", {"factor": 1 / 255}),
        Step("transpose", {"perm": [0, 3, 1, 2]}),
    ]
    pipeline = compile_steps(steps, "pre", "image")
    out = pipeline({"image": IMAGES})
    assert out["image"].shape == (2, 3, 8, 8) and out["image"].dtype == np.float32
    assert float(out["image"].max()) <= 1.0


def test_applying_steps_does_not_modify_the_callers_dict() -> None:
    tensors = {"logits": BATCH}
    apply_steps([Step("softmax", {})], tensors, "post")
    assert tensors["logits"] is BATCH


BAD_PARAMS = [
    ("cast", {"dtype": "complex"}, "not one of"),
    ("cast", {}, "expected a dtype name"),
    ("reshape", {"shape": "4x4"}, "expected a list of integers"),
    ("scale", {}, "factor"),
    ("scale", {"factor": [[1, 2]]}, "flat list"),
    ("normalize", {"mean": [0.0], "std": [0.0]}, "must not contain zero"),
    ("clip", {}, "needs 'min', 'max' or both"),
    ("topk", {"k": 0}, "must be at least 1"),
    ("topk", {"k": True}, "expected an integer"),
    ("label_map", {"labels": []}, "non-empty list"),
    ("softmax", {"output": ""}, "expected a tensor name"),
]


@pytest.mark.parametrize(("op", "params", "message"), BAD_PARAMS)
def test_bad_step_parameters_are_a_manifest_error_at_compile_time(
    op: str, params: dict[str, Any], message: str
) -> None:
    with pytest.raises(ManifestError, match=message):
        compile_steps([Step(op, params)], "post", "t")


def test_array_errors_are_input_errors_before_the_model_and_inference_errors_after() -> None:
    reshape = [Step("reshape", {"shape": [-1, 3]})]
    with pytest.raises(InputError, match="pre-processing step reshape on 't' failed"):
        apply_steps(reshape, {"t": BATCH}, "pre")
    with pytest.raises(InferenceError, match="post-processing step reshape"):
        apply_steps(reshape, {"t": BATCH}, "post")
    with pytest.raises(InferenceError, match="label_map"):
        run("label_map", np.array([5]), labels=["a"])
    with pytest.raises(InferenceError, match="integer indices"):
        run("label_map", np.array([0.5]), labels=["a"])
    with pytest.raises(InferenceError, match="k=9 exceeds the axis length 4"):
        run("topk", BATCH, k=9)


def test_a_step_reading_an_absent_tensor_names_it() -> None:
    with pytest.raises(InputError, match="needs tensor 'pixels'"):
        apply_steps([Step("scale", {"tensor": "pixels", "factor": 2})], {"t": BATCH}, "pre")


def test_tokenizer_steps_say_they_are_not_supported_yet() -> None:
    pipeline = compile_steps([Step("tokenizer", {"file": "tokenizer.json"})], "pre", "prompt")
    with pytest.raises(InferenceError, match="tokenizer 'tokenizer.json' is not supported for this runtime yet"):
        pipeline({"prompt": np.array(["hello"], dtype=object)})


def test_unknown_stage_is_refused() -> None:
    with pytest.raises(ValueError, match="stage"):
        compile_steps([], "middle", "t")
