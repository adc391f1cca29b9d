"""The importance matrix from the calibration text, given to llama.cpp's quantiser (converter.llm.imatrix)."""

from __future__ import annotations

import ctypes
import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bundles.archive import open_bundle
from bundles.canonical import sha256_file
from bundles.errors import ConversionError
from converter.home import Home
from converter.llm.gguf_file import write_gguf
from converter.llm.imatrix import ImportanceMatrix, calibration_chunks, compute_imatrix
from converter.llm.quantize import quantize
from converter.registry import Registry
from tests.conftest import ConvertedLlm
from tests.converter.helpers import ok


@pytest.fixture(scope="module")
def parent(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama as the float32 GGUF every variant is quantised from."""
    path = tmp_path_factory.mktemp("imatrix") / "f32.gguf"
    write_gguf(tiny_llama_dir, path, "tiny")
    return path


@pytest.fixture(scope="module")
def imatrix(tiny_llama_dir: Path) -> ImportanceMatrix:
    return compute_imatrix(tiny_llama_dir, tiny_llama_dir / "calibration.txt")


def test_there_is_one_entry_per_matrix_the_quantiser_looks_up_as_wide_as_its_input(
    parent: Path, imatrix: ImportanceMatrix
) -> None:
    import gguf

    matrices = {t.name: int(t.shape[0]) for t in gguf.GGUFReader(str(parent)).tensors if len(t.shape) == 2}
    del matrices["token_embd.weight"]  # a row lookup, not a matrix product: llama.cpp has no figures for it either
    assert {name: values.size for name, values in imatrix.means().items()} == matrices
    assert len(matrices) == 15 and imatrix.summary()["entries"] == 15
    assert all(np.all(np.isfinite(v)) and np.all(v > 0) for v in imatrix.means().values())
    assert set(imatrix.counts.values()) == {imatrix.tokens}


def test_it_equals_what_llama_cpps_own_collector_sees_in_the_gguf_file(
    tiny_llama_dir: Path, parent: Path, imatrix: ImportanceMatrix
) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_llama_dir))
    text = (tiny_llama_dir / "calibration.txt").read_text(encoding="utf-8")
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    chunks = calibration_chunks(ids, int(tokenizer.bos_token_id), imatrix.chunk_size)
    sums, counts = _llama_cpp_collection(parent, chunks, imatrix.chunk_size)
    assert sorted(sums) == sorted(imatrix.sums) and set(counts.values()) == {imatrix.tokens}
    for name, mean in imatrix.means().items():  # float32 torch vs llama.cpp (f16 KV cache): 5e-4 at most measured
        np.testing.assert_allclose(mean, sums[name] / counts[name], rtol=2e-3, err_msg=name)


def test_it_is_computed_on_the_whole_calibration_text_in_chunks_opened_with_bos(
    tiny_llama_dir: Path, imatrix: ImportanceMatrix
) -> None:
    data = (tiny_llama_dir / "calibration.txt").read_bytes()
    assert imatrix.calibration_sha256 == hashlib.sha256(data).hexdigest()
    assert imatrix.chunk_size == 256  # llama-imatrix's 512, capped by the tiny model's context
    assert imatrix.chunks == -(-imatrix.tokens // 256) and imatrix.tokens > 3000
    assert calibration_chunks([5, 6, 7, 8, 9], 1, 3) == [[1, 5, 6], [1, 7, 8]]  # a lone last token is dropped


def test_q4_k_m_with_the_matrix_differs_from_q4_k_m_without_and_generates(
    parent: Path, imatrix: ImportanceMatrix, tmp_path: Path
) -> None:
    from bundles.runtimes.llama_cpp import LlamaCppRuntime

    quantize(parent, tmp_path / "plain.gguf", "q4_k_m")
    quantize(parent, tmp_path / "weighted.gguf", "q4_k_m", imatrix=imatrix)
    plain, weighted = (tmp_path / "plain.gguf").read_bytes(), (tmp_path / "weighted.gguf").read_bytes()
    assert plain != weighted and len(plain) == len(weighted)
    runtime = LlamaCppRuntime.load(tmp_path / "weighted.gguf", threads=2, context=64)
    try:
        feeds = {"tokens": np.asarray([[1, 100, 200, 300]], dtype=np.int32),
                 "max_new_tokens": np.asarray([8], dtype=np.int32)}  # fmt: skip
        assert runtime.run(feeds)["generated"].shape == (1, 8)
    finally:
        runtime.close()


def test_q8_0_rounds_each_weight_alone_so_the_matrix_changes_nothing(
    parent: Path, imatrix: ImportanceMatrix, tmp_path: Path
) -> None:
    quantize(parent, tmp_path / "plain.gguf", "q8_0")
    quantize(parent, tmp_path / "weighted.gguf", "q8_0", imatrix=imatrix)
    assert (tmp_path / "plain.gguf").read_bytes() == (tmp_path / "weighted.gguf").read_bytes()


def test_the_matrix_is_written_in_llama_cpps_gguf_imatrix_format(imatrix: ImportanceMatrix, tmp_path: Path) -> None:
    import gguf

    imatrix.write_gguf(tmp_path / "imatrix.gguf", "data/calibration.txt")
    reader = gguf.GGUFReader(str(tmp_path / "imatrix.gguf"))
    kind = reader.get_field("general.type")
    assert kind is not None and bytes(kind.parts[kind.data[0]]) == b"imatrix"
    for key in ("imatrix.datasets", "imatrix.chunk_count", "imatrix.chunk_size"):
        assert reader.get_field(key) is not None
    tensors = {t.name: np.asarray(t.data, dtype=np.float32) for t in reader.tensors}
    for name, mean in imatrix.means().items():
        loaded = tensors[f"{name}.in_sum2"].ravel() / tensors[f"{name}.counts"].ravel()[0]  # as llama-quantize does
        np.testing.assert_allclose(loaded, mean, rtol=1e-6)


def test_a_llama_cpp_without_the_c_imatrix_array_is_a_clear_conversion_error(
    parent: Path, imatrix: ImportanceMatrix, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import llama_cpp

    monkeypatch.delattr(llama_cpp, "llama_model_imatrix_data")
    with pytest.raises(ConversionError, match="cannot take an importance matrix"):
        quantize(parent, tmp_path / "q4.gguf", "q4_k_m", imatrix=imatrix)
    assert not (tmp_path / "q4.gguf").exists()


def test_a_conversion_with_calibration_text_records_the_matrix_per_variant_in_the_lineage_and_on_disk(
    tiny_llm: ConvertedLlm, tmp_path: Path
) -> None:
    results = {r["variant_id"]: r for r in json.loads(tiny_llm.results_json.read_text())["results"]}
    summary = results["gguf-q4_k_m"]["metrics"]["imatrix"]
    calibration = sha256_file(tiny_llm.source / "calibration.txt")
    assert summary["calibration_sha256"] == calibration and summary["tokens"] > 3000 and summary["entries"] == 15
    assert all("imatrix" not in results[v]["metrics"] for v in ("gguf-f32", "gguf-f16", "gguf-q8_0"))
    manifest, _ = open_bundle(tiny_llm.bundle, tmp_path / "b")
    assert manifest.variant("gguf-q4_k_m").metrics["imatrix"] == summary
    lineage = manifest.lineage.extra["imatrix"]
    assert lineage["file_sha256"] == sha256_file(tiny_llm.results_json.parent / "imatrix.gguf")
    assert lineage["calibration_sha256"] == manifest.lineage.calibration_sha256 == calibration


def test_a_model_registered_without_calibration_text_builds_without_a_matrix(
    tiny_llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EDGEFLEET_HOME", str(tmp_path / "home"))
    ok("register-llm", "plain", "--source", tiny_llama_dir, "--eval-text", tiny_llama_dir / "eval.txt")
    ok("convert", "plain", "--quantize", "q4_k_m")
    registry = Registry(Home.from_env())
    conversion = registry.latest_conversion(registry.get("plain"))
    q4 = next(r for r in conversion.results if r["variant_id"] == "gguf-q4_k_m")
    assert q4["status"] == "passed" and "imatrix" not in q4["metrics"]
    conversion_dir = Home.from_env().conversion_dir("plain", 1, conversion.number)
    assert not (conversion_dir / "imatrix.gguf").exists()
    manifest, _ = open_bundle(next(conversion_dir.glob("*.efb")), tmp_path / "b")
    assert "imatrix" not in manifest.lineage.extra


class _GgmlTensor(ctypes.Structure):
    """``struct ggml_tensor`` of the ggml that llama-cpp-python ships (include/ggml.h), enough to read a MUL_MAT."""


_GgmlTensor._fields_ = [
    ("type", ctypes.c_int), ("buffer", ctypes.c_void_p), ("ne", ctypes.c_int64 * 4), ("nb", ctypes.c_size_t * 4),
    ("op", ctypes.c_int), ("op_params", ctypes.c_int32 * 16), ("flags", ctypes.c_int32),
    ("src", ctypes.POINTER(_GgmlTensor) * 10), ("view_src", ctypes.c_void_p), ("view_offs", ctypes.c_size_t),
    ("data", ctypes.c_void_p), ("name", ctypes.c_char * 64), ("extra", ctypes.c_void_p), ("padding", ctypes.c_char * 8),
]  # fmt: skip


def _llama_cpp_collection(parent: Path, chunks: list[list[int]], n_ctx: int) -> tuple[dict[str, Any], dict[str, int]]:
    """What llama-imatrix collects (tools/imatrix/imatrix.cpp): per MUL_MAT weight, the input's squares per column.

    The scheduler's eval callback sees every matrix product of the graph; every position's output is
    requested (as llama-imatrix does), so the last layer runs on all tokens.
    """
    import llama_cpp

    from bundles.runtimes.llama_cpp import extra_buffers_enabled

    ggml = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))
    ggml.ggml_op_name.restype, ggml.ggml_op_name.argtypes = ctypes.c_char_p, [ctypes.c_int]
    ggml.ggml_get_name.restype, ggml.ggml_get_name.argtypes = ctypes.c_char_p, [ctypes.c_void_p]
    sums: dict[str, Any] = {}
    counts: dict[str, int] = {}
    layout_errors: list[str] = []

    @llama_cpp.ggml_backend_sched_eval_callback  # type: ignore[misc]
    def collect(pointer: int, ask: bool, _user_data: int) -> bool:
        tensor = ctypes.cast(pointer, ctypes.POINTER(_GgmlTensor)).contents
        if ggml.ggml_get_name(pointer) != tensor.name:  # the struct above is not this ggml's
            layout_errors.append(tensor.name.decode(errors="replace"))
            return False
        if ggml.ggml_op_name(tensor.op) != b"MUL_MAT":
            return not ask
        weight, x = tensor.src[0].contents, tensor.src[1].contents
        name = weight.name.decode()
        if ask:
            return x.type == 0 and (name.startswith("blk.") or name == "output.weight")  # F32 inputs
        rows = x.ne[1] * x.ne[2] * x.ne[3]
        values = np.ctypeslib.as_array(ctypes.cast(x.data, ctypes.POINTER(ctypes.c_float)), shape=(rows, x.ne[0]))
        sums[name] = sums.get(name, 0) + np.square(values.astype(np.float64)).sum(axis=0)
        counts[name] = counts.get(name, 0) + rows
        return True

    model_params = llama_cpp.llama_model_default_params()
    model_params.use_extra_bufts = extra_buffers_enabled()  # the AMX kernels fault on some VMs (open_llama)
    model = llama_cpp.llama_model_load_from_file(str(parent).encode(), model_params)
    params = llama_cpp.llama_context_default_params()
    params.n_ctx = params.n_batch = params.n_ubatch = n_ctx
    params.n_threads = params.n_threads_batch = 2
    params.cb_eval = collect
    context = llama_cpp.llama_init_from_model(model, params)
    try:
        for chunk in chunks:
            llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(context), True)
            batch = llama_cpp.llama_batch_init(len(chunk), 0, 1)
            for i, token in enumerate(chunk):
                batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = token, i, 1, 1
                batch.seq_id[i][0] = 0
            batch.n_tokens = len(chunk)
            try:
                assert llama_cpp.llama_decode(context, batch) == 0
            finally:
                llama_cpp.llama_batch_free(batch)
    finally:
        llama_cpp.llama_free(context)
        llama_cpp.llama_model_free(model)
    assert not layout_errors, f"ggml_tensor layout differs from this ggml's: {layout_errors[:3]}"
    return sums, counts
