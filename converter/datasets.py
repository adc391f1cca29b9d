"""Evaluation and calibration data: a ``.npz`` or ``.parquet`` of model inputs and labels.

A ``.npz`` holds one array per model input (named like the input) and the labels under the
registration's label key (default ``y``). A ``.parquet`` file serves a model with one tabular
input: every column except the label column is a feature, in file order. Rows are the first axis.
Everything is checked against the declared input spec at registration, so a bad file is refused
before anything is written.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bundles.errors import ConfigError
from bundles.manifest import TensorSpec
from bundles.tensors import numpy_dtype


@dataclass(frozen=True)
class Dataset:
    """Inputs by name (first axis = rows) and optional labels; ``feature_names`` from parquet columns."""

    inputs: dict[str, np.ndarray]
    labels: np.ndarray | None
    feature_names: tuple[str, ...] = ()

    @property
    def rows(self) -> int:
        return int(next(iter(self.inputs.values())).shape[0])

    def take(self, start: int, stop: int) -> dict[str, np.ndarray]:
        """Rows ``start:stop`` of every input."""
        return {name: array[start:stop] for name, array in self.inputs.items()}


def load_dataset(path: Path, specs: tuple[TensorSpec, ...], label_key: str, what: str) -> Dataset:
    """Read and validate ``path`` against ``specs``; ``what`` names the file in errors ("eval file")."""
    if not path.is_file():
        raise ConfigError(f"{what} {path} does not exist")
    if path.suffix == ".npz":
        dataset = _load_npz(path, specs, label_key, what)
    elif path.suffix == ".parquet":
        dataset = _load_parquet(path, specs, label_key, what)
    else:
        raise ConfigError(f"{what} {path.name} is neither .npz nor .parquet")
    _check_against_spec(dataset, specs, path, what)
    return dataset


def _load_npz(path: Path, specs: tuple[TensorSpec, ...], label_key: str, what: str) -> Dataset:
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise ConfigError(f"{what} {path.name} is not a readable .npz file ({e})") from e
    missing = [s.name for s in specs if s.name not in arrays]
    if missing:
        raise ConfigError(f"{what} {path.name} has no array for input {', '.join(missing)} (has {sorted(arrays)})")
    inputs = {s.name: _cast(arrays[s.name], s, path, what) for s in specs}
    return Dataset(inputs=inputs, labels=arrays.get(label_key))


def _load_parquet(path: Path, specs: tuple[TensorSpec, ...], label_key: str, what: str) -> Dataset:
    import pyarrow.parquet as pq

    if len(specs) != 1:
        raise ConfigError(f"{what} {path.name}: a .parquet file can only feed a model with one input")
    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises its own ArrowInvalid/OSError family
        raise ConfigError(f"{what} {path.name} is not a readable .parquet file ({e})") from e
    columns = [c for c in table.column_names if c != label_key]
    matrix = np.column_stack([table.column(c).to_numpy(zero_copy_only=False) for c in columns])
    labels = table.column(label_key).to_numpy() if label_key in table.column_names else None
    spec = specs[0]
    return Dataset(inputs={spec.name: _cast(matrix, spec, path, what)}, labels=labels, feature_names=tuple(columns))


def _cast(array: np.ndarray, spec: TensorSpec, path: Path, what: str) -> np.ndarray:
    target = numpy_dtype(spec.dtype)
    if array.dtype.kind not in "biuf" or (target.kind in "iu" and array.dtype.kind == "f"):
        raise ConfigError(
            f"{what} {path.name}: input '{spec.name}' holds {array.dtype}, which cannot become {spec.dtype}"
        )
    return np.ascontiguousarray(array.astype(target, copy=False))


def _check_against_spec(dataset: Dataset, specs: tuple[TensorSpec, ...], path: Path, what: str) -> None:
    rows = {name: array.shape[0] if array.ndim else 0 for name, array in dataset.inputs.items()}
    if len(set(rows.values())) != 1 or min(rows.values()) == 0:
        raise ConfigError(f"{what} {path.name}: inputs have different or zero row counts {rows}")
    for spec in specs:
        _check_sample_shape(dataset.inputs[spec.name], spec, path, what)
    if dataset.labels is not None and dataset.labels.shape[0] != dataset.rows:
        raise ConfigError(f"{what} {path.name}: {dataset.labels.shape[0]} labels for {dataset.rows} rows")
    for name, array in dataset.inputs.items():
        if array.dtype.kind == "f" and not np.all(np.isfinite(array)):
            raise ConfigError(f"{what} {path.name}: input '{name}' holds NaN or infinity")


def _check_sample_shape(array: np.ndarray, spec: TensorSpec, path: Path, what: str) -> None:
    """Rows are the first axis: the data's per-row shape must fit the spec's dims after the batch dim."""
    declared = spec.shape[1:]
    actual = array.shape[1:]
    fits = len(declared) == len(actual) and all(d in (-1, a) for d, a in zip(declared, actual, strict=True))
    if not fits:
        raise ConfigError(
            f"{what} {path.name}: input '{spec.name}' has rows of shape {list(actual)}, "
            f"but the spec declares {list(spec.shape)} (rows of {list(declared)})"
        )


def batch_sizes_for(spec: TensorSpec) -> tuple[int, int]:
    """The smallest and largest batch the first dimension allows (fixed dims give (n, n))."""
    if spec.shape[0] != -1:
        return spec.shape[0], spec.shape[0]
    low, high = spec.dim_ranges.get("0", (1, 1))
    return low, high


def describe(dataset: Dataset) -> dict[str, Any]:
    """A short JSON-able description (rows and shapes) for ``show``."""
    return {
        "rows": dataset.rows,
        "inputs": {k: list(v.shape) for k, v in dataset.inputs.items()},
        "labels": None if dataset.labels is None else list(dataset.labels.shape),
    }
