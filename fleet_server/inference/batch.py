"""``edgefleet-server batch-predict``: score a file with the very bundle and Predictor the devices run.

Flow: the bundle comes from the server's TUF repository, verified like a device verifies it
(:class:`~fleet_server.inference.source.VerifiedBundles`), is loaded into the device
:class:`~bundles.predictor.Predictor` and self-tested; then the input is read in chunks of
``chunk_rows`` rows and each chunk is scored with one model call. A chunk that fails is scored row
by row, so a bad row is reported with its index and an ``error`` and the run goes on. Every finished
chunk is written atomically to ``<output>.parts/``; a run that is interrupted and started again with
the same arguments skips the chunks already done. At the end the parts are joined into ``output``.

Inputs: ``.npz`` (one array per model input, rows along the first axis) or ``.parquet`` (one column
per model input holding each row's values, or one column per declared feature of a single-input
model). The output has the same format: one array/column per output, plus ``row`` and ``error``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bundles.errors import ConfigError, InputError
from bundles.manifest import Manifest
from bundles.predictor import Predictor
from fleet_server.inference.settings import Configured

FORMATS = (".npz", ".parquet")


@dataclass
class BatchSummary:
    """What a run did: rows scored, rows failed (index and reason), chunks taken from an earlier run."""

    rows: int = 0
    failed: int = 0
    resumed_chunks: int = 0
    errors: list[tuple[int, str]] = field(default_factory=list)


def run_batch_predict(
    configured: Configured, ref: str, input_path: Path, output_path: Path, chunk_rows: int
) -> BatchSummary:
    """Score ``input_path`` into ``output_path`` with bundle ``ref`` (``NAME@VERSION``)."""
    name, version = _parse_ref(ref)
    _check_formats(input_path, output_path)
    predictor = _load(configured, name, version)
    try:
        columns = _read_inputs(input_path, predictor.manifest)
        return _score(predictor, columns, output_path, chunk_rows, _fingerprint(ref, input_path, chunk_rows))
    finally:
        predictor.close()


def _parse_ref(ref: str) -> tuple[str, int]:
    name, _, version = ref.partition("@")
    if not name or not version.isdigit():
        raise ConfigError(f"'{ref}' is not NAME@VERSION (e.g. digits@3)")
    return name, int(version)


def _check_formats(input_path: Path, output_path: Path) -> None:
    if not input_path.is_file():
        raise ConfigError(f"input file {input_path} does not exist")
    for path in (input_path, output_path):
        if path.suffix not in FORMATS:
            raise ConfigError(f"{path}: only {' and '.join(FORMATS)} files are supported")
    if input_path.suffix != output_path.suffix:
        raise ConfigError(f"the output must have the input's format ({input_path.suffix})")


def _load(configured: Configured, name: str, version: int) -> Predictor:
    from fleet_server.inference.source import VerifiedBundles
    from fleet_server.services.tuf_host import TufHost

    bundles = VerifiedBundles(TufHost(configured.server).storage, configured.trusted_root, configured.cache_dir)
    try:
        opened = bundles.open(name, version)
        predictor = Predictor.load(opened.manifest, opened.directory, variant=opened.variant)
    finally:
        bundles.close(remove=False)
    try:
        predictor.self_test()
    except Exception:
        predictor.close()
        raise
    return predictor


# --- reading ------------------------------------------------------------------------------------------


def _read_inputs(path: Path, manifest: Manifest) -> dict[str, list[Any] | np.ndarray]:
    """Per model input, its rows (an array, or a list of per-row values from Parquet)."""
    names = [t.name for t in manifest.inputs]
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as data:
            missing = [n for n in names if n not in data.files]
            if missing:
                raise ConfigError(f"{path} has no array(s) {', '.join(missing)} (the model takes {', '.join(names)})")
            return {n: np.asarray(data[n]) for n in names}
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    if all(n in table.column_names for n in names):
        return {n: table.column(n).to_pylist() for n in names}
    features = [f for f in manifest.features if f.tensor == names[0]]
    if len(names) == 1 and features and all(f.name in table.column_names for f in features):
        ordered = sorted(features, key=lambda f: f.index)
        rows = zip(*(table.column(f.name).to_pylist() for f in ordered), strict=True)
        return {names[0]: [list(r) for r in rows]}
    raise ConfigError(f"{path} needs a column per model input ({', '.join(names)}) or per declared feature")


def _row_count(columns: dict[str, list[Any] | np.ndarray]) -> int:
    counts = {len(v) for v in columns.values()}
    if len(counts) != 1:
        raise ConfigError("every input must have the same number of rows")
    return counts.pop()


# --- scoring ------------------------------------------------------------------------------------------


def _score(
    predictor: Predictor, columns: dict[str, Any], output_path: Path, chunk_rows: int, fingerprint: str
) -> BatchSummary:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    total = _row_count(columns)
    parts = _parts_dir(output_path, fingerprint)
    summary = BatchSummary()
    columns_done = [TextColumn("scoring"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()]
    with Progress(*columns_done, transient=False) as progress:
        task = progress.add_task("rows", total=total)
        for index, start in enumerate(range(0, total, chunk_rows)):
            stop = min(total, start + chunk_rows)
            part = parts / f"chunk-{index:06d}.npz"
            if part.exists():
                summary.resumed_chunks += 1
            else:
                _write_part(part, _score_chunk(predictor, columns, start, stop))
            with np.load(part, allow_pickle=False) as done:
                errors = done["error"]
            for offset in np.flatnonzero(errors != ""):
                summary.errors.append((start + int(offset), str(errors[offset])))
            summary.rows += stop - start
            progress.update(task, advance=stop - start)
    summary.failed = len(summary.errors)
    _join(parts, output_path, total)
    shutil.rmtree(parts, ignore_errors=True)
    return summary


def _score_chunk(predictor: Predictor, columns: dict[str, Any], start: int, stop: int) -> dict[str, np.ndarray]:
    """Outputs of rows ``start..stop`` (one model call; row by row if that fails) and an error per row."""
    try:
        outputs = predictor.predict({n: _rows(predictor, n, v, start, stop) for n, v in columns.items()}).outputs
        return {**{k: np.asarray(v) for k, v in outputs.items()}, "error": np.array([""] * (stop - start))}
    except Exception:  # noqa: BLE001 - a bad row somewhere: find it, score the others
        return _score_rows(predictor, columns, start, stop)


def _score_rows(predictor: Predictor, columns: dict[str, Any], start: int, stop: int) -> dict[str, np.ndarray]:
    answers: list[dict[str, np.ndarray] | None] = []
    errors: list[str] = []
    for i in range(start, stop):
        try:
            prediction = predictor.predict({n: _rows(predictor, n, v, i, i + 1) for n, v in columns.items()})
            answers.append({k: np.asarray(v) for k, v in prediction.outputs.items()})
            errors.append("")
        except Exception as e:  # noqa: BLE001 - reported with its index, the run goes on
            answers.append(None)
            errors.append(f"{type(e).__name__}: {e}"[:500])
    template = next((a for a in answers if a is not None), None)
    out: dict[str, np.ndarray] = {"error": np.array(errors)}
    if template is None:
        return out
    for name, value in template.items():
        filler = _filler(value)
        out[name] = np.concatenate([a[name] if a is not None else filler for a in answers])
    return out


def _rows(predictor: Predictor, name: str, values: Any, start: int, stop: int) -> np.ndarray:
    spec = next(t for t in predictor.manifest.inputs if t.name == name)
    dtype = object if spec.dtype == "string" else spec.dtype
    try:
        return np.asarray(values[start:stop], dtype=dtype)
    except (ValueError, TypeError) as e:
        raise InputError(f"input '{name}' rows {start}..{stop - 1} are not {spec.dtype} arrays of one shape") from e


def _filler(value: np.ndarray) -> np.ndarray:
    """One row standing for a failed one: NaN for floats, 0 for numbers, '' for text."""
    row = np.zeros((1, *value.shape[1:]), dtype=value.dtype if value.dtype.kind != "O" else "U1")
    if value.dtype.kind == "f":
        row[...] = np.nan
    return row.astype(value.dtype) if value.dtype.kind != "O" else row


# --- chunks on disk -----------------------------------------------------------------------------------


def _fingerprint(ref: str, input_path: Path, chunk_rows: int) -> str:
    stat = input_path.stat()
    return hashlib.sha256(
        f"{ref}|{input_path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{chunk_rows}".encode()
    ).hexdigest()


def _parts_dir(output_path: Path, fingerprint: str) -> Path:
    """``<output>.parts/`` of a run with the same arguments, or a fresh one."""
    parts = output_path.with_name(output_path.name + ".parts")
    stamp = parts / "run.json"
    if parts.exists() and (not stamp.exists() or json.loads(stamp.read_text()).get("fingerprint") != fingerprint):
        shutil.rmtree(parts)
    parts.mkdir(parents=True, exist_ok=True)
    stamp.write_text(json.dumps({"fingerprint": fingerprint}))
    return parts


def _write_part(path: Path, arrays: dict[str, np.ndarray]) -> None:
    temp = path.with_suffix(".tmp.npz")
    np.savez(temp, **{k: _storable(v) for k, v in arrays.items()})  # type: ignore[arg-type]
    with open(temp, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(temp, path)


def _storable(value: np.ndarray) -> np.ndarray:
    return value.astype(str) if value.dtype.kind == "O" else value


def _parts(parts: Path) -> Iterator[dict[str, np.ndarray]]:
    for path in sorted(parts.glob("chunk-*.npz")):
        with np.load(path, allow_pickle=False) as data:
            yield {k: data[k] for k in data.files}


def _join(parts: Path, output_path: Path, total: int) -> None:
    chunks = list(_parts(parts))
    names = sorted({k for c in chunks for k in c if k != "error"})
    joined = {n: np.concatenate([c[n] for c in chunks if n in c]) for n in names}
    joined = {n: v for n, v in joined.items() if len(v) == total}  # an output no chunk could give is left out
    joined["error"] = np.concatenate([c["error"] for c in chunks])
    joined["row"] = np.arange(total)
    temp = output_path.with_name(output_path.name + ".tmp" + output_path.suffix)
    if output_path.suffix == ".npz":
        np.savez(temp, **joined)  # type: ignore[arg-type]
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.table({n: list(v) if v.ndim > 1 else v for n, v in joined.items()})
        pq.write_table(table, temp)
    os.replace(temp, output_path)
