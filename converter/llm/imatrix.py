"""The importance matrix of a language model, computed from its calibration text, for llama.cpp's quantiser.

llama.cpp's k-quants weigh each weight's rounding error by how large the activations that multiply it
are: for every matrix product ``W @ x`` the quantiser looks up, by the GGUF tensor name of ``W``, one
float per *input column* of ``W``, the mean of ``x_j²`` over the calibration tokens. This is what
llama.cpp's ``llama-imatrix`` tool collects (``in_sum2 / counts``, tools/imatrix/imatrix.cpp) and what
``llama-quantize --imatrix`` hands to ``llama_model_quantize``.

Here the activations come from the source itself: the Hugging Face model in float32 (the weights that
were converted) runs over the calibration text, cut into chunks opened with BOS as llama-imatrix cuts
them, and a forward pre-hook on every ``nn.Linear`` adds up the squares of its inputs per column. The
GGUF names come from the same ``gguf`` tensor map the writer uses. The RoPE permutation of the query and
key projections (:func:`converter.llm.gguf_file.permute_for_rope`) reorders their *output* rows, never
their input columns, and the attention output is unchanged by it (queries and keys are permuted alike),
so the per-column figures of the source are those of the GGUF file.

llama.cpp (since ``llama_model_imatrix_data``) takes the matrix as a C array of ``{name, data, size}``
ending with a null name; :meth:`ImportanceMatrix.as_quantize_param` builds it with ctypes. The matrix is
also written in llama.cpp's GGUF imatrix format (:meth:`ImportanceMatrix.write_gguf`), so
``llama-quantize --imatrix`` can reuse it.
"""

from __future__ import annotations

import ctypes
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bundles.errors import ConversionError
from converter.llm.gguf_file import read_config

CHUNK_TOKENS = 512
"""Tokens per calibration chunk (BOS included), llama-imatrix's default context; capped by the model's."""
MAX_CALIBRATION_TOKENS = 65_536
"""At most this many calibration tokens are run (the source runs in float32 on the workstation's CPU)."""
IMATRIX_PRECISIONS = ("q4_k_m",)
"""Precisions whose quantiser uses the matrix (f16 and q8_0 round each weight alone: it would change nothing)."""


@dataclass(frozen=True)
class ImportanceMatrix:
    """Per GGUF matrix name: the sum of squared inputs per column, and how many tokens added to it."""

    sums: dict[str, np.ndarray]
    """float64 ``[input columns]`` per tensor name (``blk.0.attn_q.weight``)."""
    counts: dict[str, int]
    tokens: int
    chunks: int
    chunk_size: int
    calibration_sha256: str

    def means(self) -> dict[str, np.ndarray]:
        """What the quantiser weighs by: the mean squared input per column (float32)."""
        return {name: (total / self.counts[name]).astype(np.float32) for name, total in self.sums.items()}

    def summary(self) -> dict[str, Any]:
        """What a variant and the bundle record about the matrix it was quantised with."""
        return {"calibration_sha256": self.calibration_sha256, "tokens": self.tokens, "chunks": self.chunks,
                "entries": len(self.sums)}  # fmt: skip

    def as_quantize_param(self) -> QuantizeImatrix:
        """The C array ``llama_model_quantize_params.imatrix`` points to (keep the result alive while quantising)."""
        return QuantizeImatrix(self.means())

    def write_gguf(self, path: Path, dataset: str) -> None:
        """llama.cpp's GGUF imatrix file (``general.type`` imatrix, ``<name>.in_sum2`` and ``<name>.counts``)."""
        import gguf

        writer = gguf.GGUFWriter(str(path), "llama")  # the writer always names an architecture; loaders ignore it
        try:
            writer.add_type("imatrix")
            writer.add_array("imatrix.datasets", [dataset])
            writer.add_uint32("imatrix.chunk_count", self.chunks)
            writer.add_uint32("imatrix.chunk_size", self.chunk_size)
            for name in sorted(self.sums):
                writer.add_tensor(f"{name}.in_sum2", self.sums[name].astype(np.float32).reshape(1, -1))
                writer.add_tensor(f"{name}.counts", np.asarray([[self.counts[name]]], dtype=np.float32))
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()


class QuantizeImatrix:
    """A null-terminated ``llama_model_imatrix_data[]`` and the buffers it points into."""

    def __init__(self, means: dict[str, np.ndarray]) -> None:
        entry = imatrix_entry_type()
        self._names = [name.encode() for name in sorted(means)]
        self._values = [np.ascontiguousarray(means[name.decode()], dtype=np.float32) for name in self._names]
        self._array = (entry * (len(self._names) + 1))()
        for slot, name, values in zip(self._array, self._names, self._values, strict=False):
            slot.name = name
            slot.data = values.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            slot.size = values.size
        self.pointer = ctypes.cast(self._array, ctypes.POINTER(entry))


def imatrix_entry_type() -> Any:
    """llama-cpp-python's ``llama_model_imatrix_data`` (ConversionError on a build that has none)."""
    import llama_cpp

    entry = getattr(llama_cpp, "llama_model_imatrix_data", None)
    if entry is None:
        raise ConversionError(
            f"llama-cpp-python {getattr(llama_cpp, '__version__', '?')} has no llama_model_imatrix_data: its "
            "quantiser cannot take an importance matrix (register without --calibration-text, or install the "
            "version in the 'llm' extra)"
        )
    return entry


def compute_imatrix(hf_dir: Path, calibration: Path, max_tokens: int = MAX_CALIBRATION_TOKENS) -> ImportanceMatrix:
    """The importance matrix of the model in ``hf_dir`` on the UTF-8 text ``calibration`` (see the module docstring)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    data = calibration.read_bytes()
    text = data.decode("utf-8")
    tokenizer = AutoTokenizer.from_pretrained(str(hf_dir))
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])[:max_tokens]
    config = read_config(hf_dir)
    chunk_size = min(CHUNK_TOKENS, int(config.get("max_position_embeddings") or CHUNK_TOKENS))
    chunks = calibration_chunks(ids, int(tokenizer.bos_token_id), chunk_size)
    if not chunks:
        raise ConversionError("the calibration text is too short for an importance matrix (fewer than two tokens)")
    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32)
    model.train(False)
    sums: dict[str, Any] = {}
    counts: dict[str, int] = {}
    handles = [module.register_forward_pre_hook(_collector(name, sums, counts))
               for name, module in _linear_layers(model, config)]  # fmt: skip
    try:
        with torch.inference_mode():
            for chunk in chunks:
                model(input_ids=torch.tensor([chunk]))
    finally:
        for handle in handles:
            handle.remove()
    digest = hashlib.sha256(data).hexdigest()
    return ImportanceMatrix({n: s.numpy() for n, s in sums.items()}, counts, sum(len(c) for c in chunks),
                            len(chunks), chunk_size, digest)  # fmt: skip


def calibration_chunks(ids: list[int], bos: int, chunk_size: int) -> list[list[int]]:
    """``ids`` cut into chunks of ``chunk_size`` tokens, each opened with BOS (a last chunk of one token is dropped)."""
    step = chunk_size - 1
    return [[bos, *ids[i : i + step]] for i in range(0, len(ids), step) if len(ids[i : i + step]) > 1]


def _linear_layers(model: Any, config: dict[str, Any]) -> list[tuple[str, Any]]:
    """(GGUF tensor name, module) of every matrix product the quantiser looks up."""
    import gguf
    import torch

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, int(config["num_hidden_layers"]))
    found = []
    for hf_name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            gguf_name = names.get_name(f"{hf_name}.weight", try_suffixes=(".weight",))
            if gguf_name is None:
                raise ConversionError(f"layer '{hf_name}' has no llama.cpp name (unsupported model layout)")
            found.append((str(gguf_name), module))
    return found


def _collector(name: str, sums: dict[str, Any], counts: dict[str, int]) -> Any:
    """A forward pre-hook adding the squares of the layer's inputs per column (float64) and the token count."""

    def collect(_module: Any, inputs: tuple[Any, ...]) -> None:
        x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).double()
        squares = (x * x).sum(dim=0)
        sums[name] = squares if name not in sums else sums[name] + squares
        counts[name] = counts.get(name, 0) + int(x.shape[0])

    return collect
