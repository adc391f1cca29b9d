"""A Hugging Face Llama directory to one float32 GGUF file, and what a GGUF file holds.

The conversion follows llama.cpp's own ``convert_hf_to_gguf.py`` for the ``llama`` architecture, with
the PyPI ``gguf`` package doing the format: its tensor-name map (``gguf.get_tensor_name_map``) names
every Hugging Face tensor, the hyper-parameters go under the same keys, and the query and key
projections get llama.cpp's RoPE permutation (Hugging Face stores rotary pairs as two halves, llama.cpp
interleaves them). Without it the file loads and writes fluent-looking text while every logit is off
(top-1 agreement about 0.79 on the tiny model): only measurement catches it, so the gates do
(:mod:`converter.llm.gates`), and ``permute_rope=False`` exists so a test can prove they do.

The tokenizer is written as llama.cpp's ``llama`` (SentencePiece) vocabulary from ``tokenizer.model``:
every piece with its score and type (normal, unknown, control, unused, byte), padded to the model's
vocabulary size; ``gguf.SpecialVocab`` adds the special token ids, the add-BOS/EOS flags and the
chat template from ``tokenizer_config.json``. The float32 file is the parent of every variant: the
quantiser (:mod:`converter.llm.quantize`) writes f16, q8_0 and q4_k_m from it.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from bundles.errors import ConversionError

ARCHITECTURES = {"LlamaForCausalLM": "llama"}
"""Hugging Face architecture -> llama.cpp architecture this converter writes (with its RoPE permutation)."""


def permute_for_rope(weights: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's Q/K permutation: rotary pairs from two halves per head to interleaved (convert_hf_to_gguf)."""
    rows = weights.shape[0]
    halves = weights.reshape(n_head, 2, rows // n_head // 2, *weights.shape[1:])
    permuted: np.ndarray = halves.swapaxes(1, 2).reshape(weights.shape)
    return permuted


def write_gguf(hf_dir: Path, out_path: Path, name: str, permute_rope: bool = True) -> None:
    """Write ``hf_dir`` as a float32 GGUF (1-D tensors and matrices alike) at ``out_path``."""
    import gguf

    config = read_config(hf_dir)
    n_layer = int(config["num_hidden_layers"])
    writer = gguf.GGUFWriter(str(out_path), ARCHITECTURES[config["architectures"][0]])
    try:
        _add_hyperparameters(writer, config, name)
        _add_vocabulary(writer, hf_dir, int(config["vocab_size"]))
        names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layer)
        for hf_name, tensor in _hf_tensors(hf_dir):
            writer.add_tensor(_gguf_name(names, hf_name), _prepared(hf_name, tensor, config, permute_rope))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()


def read_config(hf_dir: Path) -> dict[str, Any]:
    """``config.json``, refused unless its architecture is one this converter writes."""
    try:
        config: dict[str, Any] = json.loads((hf_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ConversionError(f"{hf_dir}/config.json is not readable JSON ({e})") from e
    architectures = config.get("architectures") or []
    if not architectures or architectures[0] not in ARCHITECTURES:
        raise ConversionError(
            f"architecture {architectures or 'unknown'} is not supported for GGUF (supported: "
            f"{', '.join(ARCHITECTURES)})"
        )
    return config


def _add_hyperparameters(writer: Any, config: dict[str, Any], name: str) -> None:
    import gguf

    heads = int(config["num_attention_heads"])
    hidden = int(config["hidden_size"])
    writer.add_name(name)
    writer.add_context_length(int(config.get("max_position_embeddings", 2048)))
    writer.add_embedding_length(hidden)
    writer.add_block_count(int(config["num_hidden_layers"]))
    writer.add_feed_forward_length(int(config["intermediate_size"]))
    writer.add_head_count(heads)
    writer.add_head_count_kv(int(config.get("num_key_value_heads") or heads))
    writer.add_rope_dimension_count(int(config.get("head_dim") or hidden // heads))
    writer.add_rope_freq_base(float(_rope_theta(config)))
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
    writer.add_vocab_size(int(config["vocab_size"]))
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)


def _rope_theta(config: dict[str, Any]) -> float:
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if rope.get("rope_type", "default") not in ("default", None):
        raise ConversionError(f"RoPE scaling '{rope.get('rope_type')}' is not supported by this converter")
    return float(rope.get("rope_theta") or config.get("rope_theta") or 10000.0)


def _add_vocabulary(writer: Any, hf_dir: Path, vocab_size: int) -> None:
    import gguf
    import sentencepiece as spm

    model_file = hf_dir / "tokenizer.model"
    if not model_file.is_file():
        raise ConversionError(f"{hf_dir} has no tokenizer.model (a SentencePiece tokenizer is required for llama)")
    processor = spm.SentencePieceProcessor(model_file=str(model_file))
    tokens, scores, types = [], [], []
    for token_id in range(processor.vocab_size()):
        tokens.append(processor.id_to_piece(token_id).encode("utf-8"))
        scores.append(processor.get_score(token_id))
        types.append(_token_type(processor, token_id))
    for pad in range(len(tokens), vocab_size):
        tokens.append(f"[PAD{pad}]".encode())
        scores.append(-1000.0)
        types.append(gguf.TokenType.UNUSED)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    gguf.SpecialVocab(hf_dir, load_merges=False, n_vocab=len(tokens)).add_to_gguf(writer)


def _token_type(processor: Any, token_id: int) -> Any:
    import gguf

    if processor.is_unknown(token_id):
        return gguf.TokenType.UNKNOWN
    if processor.is_control(token_id):
        return gguf.TokenType.CONTROL
    if processor.is_unused(token_id):
        return gguf.TokenType.UNUSED
    if processor.is_byte(token_id):
        return gguf.TokenType.BYTE
    return gguf.TokenType.NORMAL


def _hf_tensors(hf_dir: Path) -> Any:
    """(name, float32 array) of every tensor in the directory's safetensors files, in name order."""
    from safetensors import safe_open

    files = sorted(hf_dir.glob("*.safetensors"))
    if not files:
        raise ConversionError(f"{hf_dir} has no .safetensors weights")
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for key in sorted(handle.keys()):
                yield key, handle.get_tensor(key).float().numpy()


def _gguf_name(names: Any, hf_name: str) -> str:
    found = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
    if found is None:
        raise ConversionError(f"tensor '{hf_name}' has no llama.cpp name (unsupported model layout)")
    return str(found)


def _prepared(hf_name: str, tensor: np.ndarray, config: dict[str, Any], permute_rope: bool) -> np.ndarray:
    heads = int(config["num_attention_heads"])
    if permute_rope and hf_name.endswith("q_proj.weight"):
        return permute_for_rope(tensor, heads)
    if permute_rope and hf_name.endswith("k_proj.weight"):
        return permute_for_rope(tensor, int(config.get("num_key_value_heads") or heads))
    return np.ascontiguousarray(tensor, dtype=np.float32)


def tensor_types(path: Path) -> dict[str, int]:
    """How many tensors of each type the file really holds (``{"Q4_K": 13, "Q6_K": 3, "F32": 5}``).

    llama.cpp's quantiser falls back to another type, with a log line only, when a row is not a
    multiple of the type's block size; what a variant is made of is read back from the file.
    """
    import gguf

    reader = gguf.GGUFReader(str(path))
    return dict(sorted(Counter(t.tensor_type.name for t in reader.tensors).items()))


def chat_template(path: Path) -> str | None:
    """The chat template stored in the file (``tokenizer.chat_template``), if any."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    field = reader.get_field("tokenizer.chat_template")
    if field is None:
        return None
    return bytes(field.parts[field.data[0]]).decode("utf-8")
