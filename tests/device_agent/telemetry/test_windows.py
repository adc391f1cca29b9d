"""Edge cases of the vectorised binning pass's shortcuts (the common paths run in test_recorder.py)."""

from __future__ import annotations

import numpy as np

from device_agent.telemetry.windows import _count_nonfinite


def outputs(*arrays: np.ndarray) -> list[dict[str, np.ndarray]]:
    return [{"logits": a} for a in arrays]


def test_non_finite_output_rows_are_counted_across_batches_and_dtypes() -> None:
    fine = np.ones((1, 3), dtype=np.float32)
    nan_row = np.array([[np.nan, 0.0, 1.0]], dtype=np.float32)
    batch = np.array([[np.inf, 0.0, 0.0], [1.0, 1.0, 1.0], [0.0, -np.inf, np.nan]], dtype=np.float32)
    assert _count_nonfinite(outputs(fine, fine), "logits") == 0
    assert _count_nonfinite(outputs(fine, nan_row, batch), "logits") == 3
    # a float64 NaN read as float32 bytes would still look non-finite, but a float32 NaN read as float64
    # would not: mixed dtypes must not take the joined-bytes shortcut
    assert _count_nonfinite(outputs(np.ones((1, 3)), nan_row), "logits") == 1
    strided = np.array([[1.0, np.nan, 2.0, 3.0, 4.0, 5.0]], dtype=np.float32)[:, ::2]  # not contiguous
    assert _count_nonfinite(outputs(fine, strided), "logits") == 0
    assert _count_nonfinite(outputs(fine, np.array([[1.0, np.nan, 2.0, 3.0]], dtype=np.float32)[:, 1:]), "logits") == 1
