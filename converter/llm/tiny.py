"""A tiny Llama made here, for tests, benchmarks and the demo: no model hub is reachable from a fleet's CI.

:func:`tiny_llama` trains a SentencePiece BPE tokenizer (vocabulary 512, byte fallback) and a
2-layer Llama (hidden 256, intermediate 512, 4 heads, 2 key/value heads: every matrix row a multiple
of 256, so llama.cpp's k-quants apply without falling back) for a fixed number of steps on the
licence texts every Debian-like system ships (``/usr/share/common-licenses``), so that its
next-token distributions are far from flat and quantisation error shows in the gates. It writes a
Hugging Face directory (``config.json``, ``model.safetensors``, ``tokenizer.model``,
``tokenizer.json``, ``tokenizer_config.json`` with a chat template) plus ``eval.txt`` and
``calibration.txt`` (held-out and training text). The directory is cached under ``cache_root`` by a
hash of everything that shapes it, and published atomically: a second call costs nothing.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

TEXT_DIR = Path("/usr/share/common-licenses")
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
"""A plain chat template (the tiny model was never tuned for chat: it only has to be applied the same everywhere)."""


@dataclass(frozen=True)
class TinyLlamaRecipe:
    """Everything that shapes the tiny model (part of its cache key)."""

    vocab_size: int = 512
    hidden_size: int = 256
    intermediate_size: int = 512
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    context: int = 256
    steps: int = 300
    batch: int = 16
    sequence: int = 64
    learning_rate: float = 3e-3
    seed: int = 0


def training_text() -> str:
    """The licence texts, each file once (several names are links to the same text), in name order."""
    seen: set[Path] = set()
    parts = []
    for path in sorted(TEXT_DIR.iterdir()):
        real = path.resolve()
        if real in seen or not real.is_file():
            continue
        seen.add(real)
        parts.append(real.read_text(encoding="utf-8", errors="replace"))
    return "\n".join(parts)


def tiny_llama(cache_root: Path, recipe: TinyLlamaRecipe | None = None) -> Path:
    """The Hugging Face directory of the tiny Llama (built on the first call, cached afterwards)."""
    recipe = recipe or TinyLlamaRecipe()
    text = training_text()
    key = hashlib.sha256(json.dumps(asdict(recipe)).encode() + text.encode() + Path(__file__).read_bytes())
    final = Path(cache_root) / f"tiny-llama-{key.hexdigest()[:16]}"
    if (final / "config.json").is_file():
        return final
    Path(cache_root).mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix="tiny-llama-", dir=cache_root))
    try:
        _build(staging, recipe, text)
        os.replace(staging, final)
    except OSError:
        if not (final / "config.json").is_file():  # another process won the race: theirs is as good
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final


def _build(dest: Path, recipe: TinyLlamaRecipe, text: str) -> None:
    held_out = len(text) * 9 // 10
    train_text, eval_text = text[:held_out], text[held_out:]
    _train_tokenizer(dest, train_text, recipe)
    _write_tokenizer_config(dest)
    ids = _encode(dest, train_text)
    _train_model(dest, ids, recipe)
    (dest / "eval.txt").write_text(eval_text[:6000], encoding="utf-8")
    (dest / "calibration.txt").write_text(train_text[:6000], encoding="utf-8")


def _train_tokenizer(dest: Path, text: str, recipe: TinyLlamaRecipe) -> None:
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([line for line in text.splitlines() if line.strip()]), model_writer=model,
        vocab_size=recipe.vocab_size, model_type="bpe", byte_fallback=True, unk_id=0, bos_id=1, eos_id=2,
        pad_id=-1, num_threads=1, minloglevel=2, character_coverage=1.0,
    )  # fmt: skip
    (dest / "tokenizer.model").write_bytes(model.getvalue())


def _write_tokenizer_config(dest: Path) -> None:
    """``tokenizer_config.json``, then ``tokenizer.json`` as transformers converts it (needs protobuf)."""
    from transformers import AutoTokenizer

    config = {
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": True, "add_eos_token": False, "legacy": False, "model_max_length": 256,
        "chat_template": CHAT_TEMPLATE,
    }  # fmt: skip
    (dest / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    tokenizer = AutoTokenizer.from_pretrained(dest)
    tokenizer.save_pretrained(dest)


def _encode(dest: Path, text: str) -> list[int]:
    import sentencepiece as spm

    processor = spm.SentencePieceProcessor(model_file=str(dest / "tokenizer.model"))
    ids: list[int] = []
    for paragraph in text.split("\n\n"):
        if paragraph.strip():
            ids += [processor.bos_id(), *processor.encode(paragraph)]
    return ids


def _train_model(dest: Path, ids: list[int], recipe: TinyLlamaRecipe) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(recipe.seed)
    config = LlamaConfig(
        vocab_size=recipe.vocab_size, hidden_size=recipe.hidden_size, intermediate_size=recipe.intermediate_size,
        num_hidden_layers=recipe.layers, num_attention_heads=recipe.heads, num_key_value_heads=recipe.kv_heads,
        max_position_embeddings=recipe.context, rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1,
        eos_token_id=2,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    data = torch.tensor(ids, dtype=torch.long)
    optimiser = torch.optim.AdamW(model.parameters(), lr=recipe.learning_rate)
    generator = torch.Generator().manual_seed(recipe.seed)
    model.train()
    for _ in range(recipe.steps):
        starts = torch.randint(0, len(ids) - recipe.sequence - 1, (recipe.batch,), generator=generator)
        batch = torch.stack([data[s : s + recipe.sequence] for s in starts.tolist()])
        loss = model(input_ids=batch, labels=batch).loss
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    model.train(False)
    model.save_pretrained(dest)
