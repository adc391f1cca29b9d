"""GGUF precisions through llama.cpp's own quantiser (``llama_model_quantize`` in llama-cpp-python).

Every variant is written from the float32 parent (:func:`converter.llm.gguf_file.write_gguf`). The
quantiser returns success even when it silently used another type for tensors whose rows are not a
multiple of the type's block size (32 for q8_0, 256 for the k-quants), so the effective tensor types
are read back from the written file and reported with the variant. With calibration text the k-quant
variants get an importance matrix (:mod:`converter.llm.imatrix`), passed as llama.cpp's C array of
``llama_model_imatrix_data``; whether a variant had one is reported with it.
"""

from __future__ import annotations

import ctypes
from pathlib import Path
from typing import TYPE_CHECKING

from bundles.errors import ConversionError

if TYPE_CHECKING:
    from converter.llm.imatrix import ImportanceMatrix

PRECISIONS = ("f16", "q8_0", "q4_k_m")
"""The GGUF precisions this converter writes, in ladder order (most aggressive last)."""
_FTYPES = {"f16": "LLAMA_FTYPE_MOSTLY_F16", "q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M"}
NOMINAL_TYPES = {"f16": "F16", "q8_0": "Q8_0", "q4_k_m": "Q4_K"}
"""The type most matrices of a precision should have: a variant where none has it did not quantise."""


def quantize(parent: Path, out_path: Path, precision: str, threads: int = 2,
             imatrix: ImportanceMatrix | None = None) -> None:  # fmt: skip
    """Write ``precision`` of the float32 GGUF ``parent`` at ``out_path`` (ConversionError on failure).

    With ``imatrix`` the quantiser weighs each weight's rounding error by it; an entry whose size is not
    the tensor's input width makes llama.cpp fail, which is reported like any other failure.
    """
    import llama_cpp

    if precision not in _FTYPES:
        raise ConversionError(f"no GGUF recipe for precision '{precision}' (known: {', '.join(PRECISIONS)})")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, _FTYPES[precision])
    params.nthread = max(1, threads)
    table = imatrix.as_quantize_param() if imatrix is not None else None  # referenced until the call returns
    if table is not None:
        params.imatrix = table.pointer
    code = llama_cpp.llama_model_quantize(str(parent).encode(), str(out_path).encode(), ctypes.byref(params))
    if code != 0 or not out_path.is_file():
        raise ConversionError(f"llama.cpp's quantiser failed for {precision} (code {code})")
