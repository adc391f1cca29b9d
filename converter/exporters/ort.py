"""The ``ort`` target: ORT-format models for ONNX Runtime Mobile, with the reduced-build operator config.

Each precision's ONNX model is converted by ``onnxruntime.tools.convert_onnx_models_to_ort``
(fixed optimisation style) to ``model.ort``; ``required_operators.config`` lists the operators a
reduced-operator ORT Mobile build must include (``build.sh --include_ops_by_config``).

Reproducibility: ONNX Runtime writes the kernel-type table of an ORT file in the order of a hash
map whose seed depends on memory addresses, so two conversions of the same model differ in bytes.
The conversion therefore runs in a child process with address-space randomisation disabled
(``setarch <arch> -R``, Linux), which makes the bytes reproducible; where ``setarch`` is missing
it runs without, and the variant's details say ``reproducible: false``. All ladder precisions
are converted in one child process to pay its start-up once. The config's comment naming the
temporary input path is rewritten to the file name.

ORT-format fp32 runs slower than plain ONNX on x86 (layout optimisations are not baked in), so an
``ort`` variant is compared with the ``ort`` fp32 parent, never with the ``onnx`` one.
"""

from __future__ import annotations

import functools
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from bundles.errors import ConversionError
from bundles.manifest import Requirements
from converter.build_context import BuildContext
from converter.exporters import BuiltVariant
from converter.exporters.onnx import SessionRunner, min_runtime_version
from converter.quantize import PRECISIONS as LADDER

TARGET = "ort"
RUNTIME = "onnxruntime"
PRECISIONS = LADDER
ENTRY = "model.ort"
CONFIG = "required_operators.config"
_TIMEOUT_S = 600


def build(ctx: BuildContext, precision: str, out_dir: Path) -> BuiltVariant:
    onnx_path = ctx.onnx_variant(precision)
    converted = _converted(ctx, precision, onnx_path)
    out_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(converted / f"{precision}.ort", out_dir / ENTRY)
    _write_config(converted / CONFIG, out_dir / CONFIG)
    return BuiltVariant(
        target=TARGET,
        precision=precision,
        directory=out_dir,
        entry=ENTRY,
        files=[ENTRY, CONFIG],
        requirements=Requirements(runtime=RUNTIME, min_runtime_version=min_runtime_version(onnx_path)),
        details={"reproducible": _setarch() is not None},
    )


def _converted(ctx: BuildContext, precision: str, onnx_path: Path) -> Path:
    """The directory holding ``<precision>.ort``: the ladder is converted in one batch on first use."""
    batch: dict[str, Path] = ctx.cache.setdefault("ort-batches", {})
    if precision not in batch:
        precisions = [p for p in LADDER if _buildable(ctx, p)] if precision in LADDER else [precision]
        try:
            out = _convert_batch(ctx, {p: ctx.onnx_variant(p) for p in precisions})
        except ConversionError:
            if precisions == [precision]:
                raise
            precisions = [precision]  # one model broke the batch: convert the requested one on its own
            out = _convert_batch(ctx, {precision: onnx_path})
        batch.update({p: out / p for p in precisions})
    return batch[precision]


def _buildable(ctx: BuildContext, precision: str) -> bool:
    try:
        ctx.onnx_variant(precision)
    except ConversionError:
        return False  # reported when that precision itself is requested
    return True


def _convert_batch(ctx: BuildContext, models: dict[str, Path]) -> Path:
    """Convert each model in its own folder (the tool writes one config per folder) in one child process."""
    root = Path(tempfile.mkdtemp(prefix="ort-", dir=ctx.work_dir))
    for precision, path in models.items():
        (root / precision).mkdir()
        shutil.copyfile(path, root / precision / f"{precision}.onnx")
    script = (
        "import sys; from pathlib import Path\n"
        "from onnxruntime.tools.convert_onnx_models_to_ort import convert_onnx_models_to_ort, OptimizationStyle\n"
        "for d in sys.argv[1:]:\n"
        "    convert_onnx_models_to_ort(Path(d), output_dir=Path(d), optimization_styles=[OptimizationStyle.Fixed])\n"
    )
    command = [sys.executable, "-c", script, *[str(root / p) for p in models]]
    prefix = _setarch()
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    result = subprocess.run(prefix + command if prefix else command, capture_output=True, text=True, env=env,
                            timeout=_TIMEOUT_S, check=False)  # fmt: skip
    if result.returncode != 0:
        tail = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise ConversionError(f"conversion to the ORT format failed: {tail[:300]}")
    for precision in models:
        if not (root / precision / f"{precision}.ort").exists():
            raise ConversionError(f"conversion to the ORT format produced no file for {precision}")
    return root


@functools.lru_cache(maxsize=1)
def _setarch() -> list[str] | None:
    """``setarch <arch> -R`` when this host can run a child without address-space randomisation.

    Probed once: some sandboxes forbid changing the process personality, and then the conversion
    runs without it rather than failing.
    """
    tool = shutil.which("setarch")
    if tool is None or sys.platform != "linux":
        return None
    prefix = [tool, platform.machine(), "-R"]
    probe = subprocess.run([*prefix, sys.executable, "-c", "pass"], capture_output=True, timeout=60, check=False)
    return prefix if probe.returncode == 0 else None


def _write_config(source: Path, dest: Path) -> None:
    lines = source.read_text().splitlines()
    cleaned = [f"# - {ENTRY}" if line.startswith("# - ") else line for line in lines]
    dest.write_text("\n".join(cleaned) + "\n")


def open_runner(variant: BuiltVariant) -> SessionRunner:
    return SessionRunner(variant.entry_path, what=variant.id)
