"""The ``ort`` target: ORT-format models for ONNX Runtime Mobile, with the reduced-build operator config.

Each precision's ONNX model is converted the way ``onnxruntime.tools.convert_onnx_models_to_ort``
does it (fixed optimisation style: all graph optimisations except the x86-only NCHWc layout,
applied by an ``InferenceSession`` that saves the optimised graph in ORT format) to ``model.ort``;
``required_operators.config`` lists the operators a reduced-operator ORT Mobile build must
include (``build.sh --include_ops_by_config``).

Reproducibility. ONNX Runtime serialises parts of an ORT file in the order of hash maps keyed by
memory addresses: the logical content of two conversions is the same, the byte layout is not.
With address-space randomisation the bytes differ on every run; without it (``setarch <arch>
-R``) the addresses still follow the size of everything the process was started with. The tool
took absolute temporary paths and the caller's whole environment, so a longer temporary path or
one more environment variable (``pytest-9`` -> ``pytest-10``, a changed ``PWD``) moved the heap
and changed the bytes now and then (1 conversion in 8-10). The conversion therefore runs in a child
process that sees nothing that varies: no address-space randomisation, an empty environment but
``PYTHONHASHSEED=0``, one thread, its working directory set to the model folder and the model
passed by a fixed relative name and read as bytes; one child per model (a child's earlier work
moves the heap too). Where ``setarch`` is missing or forbidden the variant's manifest metrics say
``"reproducible": false``.

ORT-format fp32 runs slower than plain ONNX on x86 (layout optimisations are not baked in), so an
``ort`` variant is compared with the ``ort`` fp32 parent, never with the ``onnx`` one.
"""

from __future__ import annotations

import functools
import logging
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from bundles.errors import ConversionError
from bundles.manifest import Requirements
from converter.build_context import BuildContext
from converter.exporters import BuiltVariant
from converter.exporters.onnx import SessionRunner, min_runtime_version
from converter.exporters.onnx import runtime_version as runtime_version
from converter.quantize import PRECISIONS as LADDER

TARGET = "ort"
RUNTIME = "onnxruntime"
PRECISIONS = LADDER
ENTRY = "model.ort"
CONFIG = "required_operators.config"
_TIMEOUT_S = 600


_CHILD = """
import sys
import onnxruntime as ort
for name in sys.argv[1:]:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = name + ".ort"
    options.add_session_config_entry("session.save_model_format", "ORT")
    with open(name + ".onnx", "rb") as f:
        model = f.read()
    ort.InferenceSession(model, sess_options=options, providers=["CPUExecutionProvider"],
                         disabled_optimizers=["NchwcTransformer"])
"""
"""The child: ``<name>.onnx`` in its working directory to ``<name>.ort`` (as the tool's Fixed style)."""


def build(ctx: BuildContext, precision: str, out_dir: Path) -> BuiltVariant:
    onnx_path = ctx.onnx_variant(precision)
    converted = _converted(ctx, precision, onnx_path)
    out_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(converted, out_dir / ENTRY)
    _write_config(out_dir / ENTRY, out_dir / CONFIG)
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
    """``model.ort`` converted from ``onnx_path`` in a child process that sees nothing that varies.

    One child per model, always named ``model``: the bytes of one model's conversion depend on what
    the same process converted before it, so a batch would tie each rung to the others requested.
    """
    folder = Path(tempfile.mkdtemp(prefix=f"ort-{precision}-", dir=ctx.work_dir))
    shutil.copyfile(onnx_path, folder / "model.onnx")
    command = [sys.executable, "-c", _CHILD, "model"]
    prefix = _setarch()
    result = subprocess.run(prefix + command if prefix else command, capture_output=True, text=True, cwd=folder,
                            env=_child_env(), timeout=_TIMEOUT_S, check=False)  # fmt: skip
    if result.returncode != 0:
        tail = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise ConversionError(f"conversion to the ORT format failed: {tail[:300]}")
    if not (folder / "model.ort").exists():
        raise ConversionError("conversion to the ORT format produced no file")
    return folder / "model.ort"


@functools.lru_cache(maxsize=1)
def _child_env() -> dict[str, str]:
    """The child's whole environment: its size moves the heap, so nothing of the caller's may leak in.

    ``PYTHONPATH`` names where this process found ONNX Runtime (fixed for an installation), so the
    child imports the same one however the converter was started.
    """
    import onnxruntime

    return {"PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(onnxruntime.__file__).parents[1])}


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
    probe = subprocess.run([*prefix, sys.executable, "-c", "pass"], capture_output=True, timeout=60, check=False,
                           env=_child_env())  # fmt: skip
    return prefix if probe.returncode == 0 else None


def _write_config(model: Path, dest: Path) -> None:
    """``required_operators.config`` of ``model``, its header naming the entry file instead of a build path."""
    from onnxruntime.tools.ort_format_model import create_config_from_models

    logging.getLogger("ort_format_model.utils").setLevel(logging.WARNING)  # "Created config in <path>" on stderr
    raw = dest.with_suffix(".raw")
    create_config_from_models([model], raw, enable_type_reduction=False)
    lines = raw.read_text().splitlines()
    raw.unlink()
    cleaned = [f"# - {ENTRY}" if line.startswith("# - ") else line for line in lines]
    dest.write_text("\n".join(cleaned) + "\n")


def open_runner(variant: BuiltVariant, runtime: str = RUNTIME, ctx: Any = None) -> SessionRunner:  # noqa: ARG001
    return SessionRunner(variant.entry_path, what=variant.id)
