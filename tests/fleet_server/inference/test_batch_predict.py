"""``edgefleet-server batch-predict``: the same verified bundle and Predictor, in resumable chunks."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from bundles.testing import reference_classifier
from fleet_server.cli import app as cli
from fleet_server.inference import batch
from tests.fleet_server.inference.conftest import Fleet, configured_for

ROWS = np.random.default_rng(5).uniform(-2, 2, size=(10, 4)).astype(np.float32)


def _env(fleet: Fleet) -> dict[str, str]:
    s = fleet.settings
    return {"EDGEFLEET_DATA_DIR": str(s.data_dir), "EDGEFLEET_DATABASE_URL": str(s.database_url),
            "EDGEFLEET_TOKEN_PEPPER": s.token_pepper, "EDGEFLEET_PUBLIC_URL": s.public_url}  # fmt: skip


def test_parquet_rows_are_scored_like_the_reference_and_a_bad_row_is_reported(fleet: Fleet, tmp_path: Path) -> None:
    source = tmp_path / "rows.parquet"
    cells: list[object] = [list(map(float, r)) for r in ROWS]
    cells[6] = [1.0, 2.0]  # wrong length: this row cannot be scored
    pq.write_table(pa.table({"x": cells}), source)
    out = tmp_path / "scored.parquet"
    result = CliRunner().invoke(cli, ["batch-predict", "tiny@1", "--input", str(source), "--output", str(out),
                                      "--chunk-rows", "4"], env=_env(fleet))  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "10 rows scored" in result.output and "1 failed" in result.output
    assert "row 6:" in result.output
    table = pq.read_table(out).to_pydict()
    assert table["row"] == list(range(10))
    assert table["error"][6] and not any(table["error"][i] for i in range(10) if i != 6)
    expected = reference_classifier().logits(ROWS)
    got = np.array([table["logits"][i] for i in range(10) if i != 6])
    np.testing.assert_allclose(got, np.delete(expected, 6, axis=0), atol=1e-5)
    assert not (tmp_path / "scored.parquet.parts").exists()


def test_an_interrupted_run_resumes_from_its_finished_chunks(
    fleet: Fleet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source, out = tmp_path / "rows.npz", tmp_path / "scored.npz"
    np.savez(source, x=ROWS)
    configured = configured_for(fleet)
    real = batch._score_chunk
    calls: list[int] = []

    def crash_on_third_chunk(predictor, columns, start, stop):  # type: ignore[no-untyped-def]
        calls.append(start)
        if len(calls) == 3:
            raise KeyboardInterrupt  # the operator pressed Ctrl-C, or the host went down
        return real(predictor, columns, start, stop)

    monkeypatch.setattr(batch, "_score_chunk", crash_on_third_chunk)
    with pytest.raises(KeyboardInterrupt):
        batch.run_batch_predict(configured, "tiny@1", source, out, chunk_rows=3)
    assert sorted(os.listdir(tmp_path / "scored.npz.parts")) == ["chunk-000000.npz", "chunk-000001.npz", "run.json"]
    monkeypatch.setattr(batch, "_score_chunk", real)
    summary = batch.run_batch_predict(configured, "tiny@1", source, out, chunk_rows=3)
    assert summary.resumed_chunks == 2 and summary.rows == 10 and summary.failed == 0
    with np.load(out) as scored:
        np.testing.assert_allclose(scored["logits"], reference_classifier().logits(ROWS), atol=1e-5)
        assert list(scored["label"][:3]) == [f"c{i}" for i in reference_classifier().logits(ROWS[:3]).argmax(1)]


@pytest.mark.parametrize(
    ("args", "says"),
    [(["tiny", "--input", "in.npz", "--output", "o.npz"], "NAME@VERSION"),
     (["tiny@1", "--input", "missing.npz", "--output", "o.npz"], "does not exist"),
     (["nosuch@1", "--input", "in.npz", "--output", "o.npz"], "not published"),
     (["tiny@1", "--input", "in.npz", "--output", "o.csv"], "only .npz and .parquet")],
)  # fmt: skip
def test_bad_arguments_end_with_one_readable_line(fleet: Fleet, tmp_path: Path, args: list[str], says: str) -> None:
    np.savez(tmp_path / "in.npz", x=ROWS)
    os.chdir(tmp_path)
    result = CliRunner().invoke(cli, ["batch-predict", *args], env=_env(fleet))
    assert result.exit_code == 1
    assert says in result.output
    assert "Traceback" not in result.output
