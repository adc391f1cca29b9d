"""Registering a Hugging Face causal language model: a directory, an evaluation text, a calibration text.

The directory must hold ``config.json`` with a supported architecture (:data:`converter.llm.gguf_file.
ARCHITECTURES`), ``*.safetensors`` weights and a SentencePiece ``tokenizer.model`` (plus whatever
tokenizer files transformers reads: ``tokenizer.json``, ``tokenizer_config.json``, a chat template).
The texts must be UTF-8 and long enough to score (:data:`MIN_EVAL_CHARS`). Everything is checked
before anything is written; the version is then recorded like any other (``converter.register``),
with source kind ``hf-llm``, the spec's task ``generation`` and the gates and serving limits in
``spec.llm`` (:class:`LlmSettings`).
"""

from __future__ import annotations

import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bundles.errors import ConfigError, ConversionError
from bundles.manifest import TensorSpec
from converter.context import about
from converter.home import staging_dir
from converter.llm.gates import LlmBudgets
from converter.llm.gguf_file import read_config
from converter.register import _NAME_RE, _insert
from converter.registry import ModelVersion, Registry
from converter.spec import ModelSpec, ServingPolicy

SOURCE_KIND = "hf-llm"
MIN_EVAL_CHARS = 500
GENERATION_INPUTS = (
    TensorSpec(name="tokens", dtype="int32", shape=(1, -1)),
    TensorSpec(name="max_new_tokens", dtype="int32", shape=(1,)),
)
"""A generation bundle's tensor face (what the golden self-test replays): prompt ids, greedy token budget."""
GENERATION_OUTPUTS = (TensorSpec(name="generated", dtype="int32", shape=(1, -1)),)
_SOURCE_GLOBS = (
    "config.json", "generation_config.json", "*.safetensors", "tokenizer.model", "tokenizer.json",
    "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja", "chat_template.json",
)  # fmt: skip


@dataclass(frozen=True)
class LlmSettings:
    """The gates a language model's variants must pass and how devices serve it (persisted: stable keys)."""

    budgets: LlmBudgets = field(default_factory=LlmBudgets)
    max_prompt_tokens: int = 0
    """Longest prompt a device accepts (0: the model's context less ``max_new_tokens``)."""
    max_new_tokens: int = 256
    """Most tokens one request may generate (requests asking more are capped)."""
    max_generation_s: float = 30.0
    """Wall time one generation may take; past it the answer ends with stop reason ``time_limit``."""

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1 or self.max_prompt_tokens < 0 or not self.max_generation_s > 0:
            raise ConfigError("--max-new-tokens and --max-generation-s must be positive, --max-prompt-tokens >= 0")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "budgets": self.budgets.to_dict()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LlmSettings:
        budgets = LlmBudgets.from_dict(data.get("budgets") or {})
        others = {k: v for k, v in data.items() if k in cls.__dataclass_fields__ and k != "budgets"}
        return cls(budgets=budgets, **others)


def register_llm(registry: Registry, name: str, hf_dir: Path, eval_text: Path, calibration_text: Path | None,
                 settings: LlmSettings, serving: ServingPolicy | None = None) -> ModelVersion:  # fmt: skip
    """Check and record a new version of the language model ``name``; nothing is written if a check fails."""
    if not _NAME_RE.match(name):
        raise ConfigError(f"model name '{name}' must be lowercase letters, digits, '.', '_' or '-' (max 64)")
    with about(f"{name} (new version)", "source"):
        files = _check_source(hf_dir)
        _check_text(eval_text, "evaluation text", MIN_EVAL_CHARS)
        if calibration_text is not None:
            _check_text(calibration_text, "calibration text", 1)
        spec = ModelSpec(task="generation", inputs=GENERATION_INPUTS, metric=None, serving=serving or ServingPolicy(),
                         llm=settings.to_dict())  # fmt: skip
        with staging_dir(registry.home.root / "artifacts" / name / "staging") as staging:
            (staging / "source").mkdir()
            (staging / "data").mkdir()
            for file in files:
                shutil.copyfile(file, staging / "source" / file.name)
            shutil.copyfile(eval_text, staging / "data" / "eval.txt")
            if calibration_text is not None:
                shutil.copyfile(calibration_text, staging / "data" / "calibration.txt")
            stored = [f.name for f in files]
            calibration = None if calibration_text is None else Path("calibration.txt")
            return _insert(registry, name, SOURCE_KIND, f"{SOURCE_KIND}:{hf_dir}", stored, spec, staging,
                           Path("eval.txt"), calibration)  # fmt: skip


def _check_source(hf_dir: Path) -> list[Path]:
    if not hf_dir.is_dir():
        raise ConfigError(f"{hf_dir} is not a directory (expected a Hugging Face model directory)")
    try:
        read_config(hf_dir)
    except ConversionError as e:
        raise ConfigError(str(e)) from e
    files = sorted({f for pattern in _SOURCE_GLOBS for f in hf_dir.glob(pattern) if f.is_file()})
    names = {f.name for f in files}
    if not any(n.endswith(".safetensors") for n in names):
        raise ConfigError(f"{hf_dir} has no .safetensors weights")
    if "tokenizer.model" not in names:
        raise ConfigError(f"{hf_dir} has no tokenizer.model (a SentencePiece tokenizer is required for llama)")
    return files


def _check_text(path: Path, what: str, min_chars: int) -> None:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{what} {path} is not a readable UTF-8 file ({e})") from e
    if len(text.strip()) < min_chars:
        raise ConfigError(f"{what} {path} holds {len(text.strip())} characters; at least {min_chars} are needed")


def settings_of(model: ModelVersion) -> LlmSettings:
    """The registered gates and limits of a language model version."""
    if model.spec.llm is None:
        raise ConfigError(f"{model.ref} is not a language model")
    return LlmSettings.from_dict(model.spec.llm)
