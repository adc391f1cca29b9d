"""Session-wide fixtures shared by several test packages.

``digits_all_targets``: the digits CNN registered and converted once per session to ONNX, TFLite
and Core ML with every rung of every ladder (about half a minute on 2 cores), used by the converter's
target tests and by the end-to-end TFLite rollout. ``--prefer size`` keeps quantised variants that
are slower than their fp32 parent on this x86 host (with the finding as a note), so what is
published does not depend on the load of a shared machine; refusals by measured accuracy still
refuse.

This file is collected with every test, including the agent's subset that ``make check-arm64`` runs on a
device root without the workstation's packages: the converter's helpers (typer, torch) are imported
inside the fixtures that use them, never at module level.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from tests.converter.conftest import DigitsCnn


@dataclass(frozen=True)
class ConvertedDigits:
    """A home with digits@1 converted once to onnx, tflite and coreml."""

    home: Path
    cnn: DigitsCnn

    @property
    def bundle(self) -> Path:
        return next((self.home / "artifacts" / "digits" / "1" / "conversions" / "1").glob("*.efb"))

    @property
    def report_dir(self) -> Path:
        return self.home / "reports" / "digits" / "1" / "conversion-1"

    @property
    def results_json(self) -> Path:
        return self.home / "artifacts" / "digits" / "1" / "conversions" / "1" / "results.json"


@pytest.fixture(scope="session")
def digits_all_targets(tmp_path_factory: pytest.TempPathFactory) -> ConvertedDigits:
    from tests.converter.conftest import train_digits_cnn
    from tests.converter.helpers import ok, register_cnn

    cnn = train_digits_cnn(tmp_path_factory.mktemp("digits_cnn_all_targets"))
    root = tmp_path_factory.mktemp("home-all-targets")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("EDGEFLEET_HOME", str(root))
        register_cnn("digits", cnn, "--prefer", "size")
        ok("convert", "digits", "--targets", "onnx,tflite,coreml", "--quantize", "auto")
    return ConvertedDigits(root, cnn)


@dataclass(frozen=True)
class ConvertedLlm:
    """A home with tiny-llm@1 (the tiny Llama) converted once to gguf f16, q8_0 and q4_k_m."""

    home: Path
    source: Path

    @property
    def bundle(self) -> Path:
        return next((self.home / "artifacts" / "tiny-llm" / "1" / "conversions" / "1").glob("*.efb"))

    @property
    def results_json(self) -> Path:
        return self.home / "artifacts" / "tiny-llm" / "1" / "conversions" / "1" / "results.json"


@pytest.fixture(scope="session")
def tiny_llama_dir(request: pytest.FixtureRequest) -> Path:
    """The tiny Llama's Hugging Face directory: trained once (under a minute) and cached by its recipe's hash."""
    from converter.llm.tiny import tiny_llama

    return tiny_llama(request.config.cache.mkdir("edgefleet-tiny-llama"))


@pytest.fixture(scope="session")
def tiny_llm(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path) -> ConvertedLlm:
    from tests.converter.helpers import ok

    root = tmp_path_factory.mktemp("home-llm")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("EDGEFLEET_HOME", str(root))
        ok("register-llm", "tiny-llm", "--source", tiny_llama_dir, "--eval-text", tiny_llama_dir / "eval.txt",
           "--calibration-text", tiny_llama_dir / "calibration.txt", "--max-new-tokens", "64")  # fmt: skip
        ok("convert", "tiny-llm", "--quantize", "f16,q8_0,q4_k_m")
    return ConvertedLlm(root, tiny_llama_dir)
