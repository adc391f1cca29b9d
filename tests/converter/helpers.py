"""Shared CLI helpers for the converter tests."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from converter.cli import app

runner = CliRunner()


def cli(*args: str | Path) -> tuple[int, str, str]:
    """Run edgefleet-convert in-process; returns (exit code, stdout, stderr)."""
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


def ok(*args: str | Path) -> str:
    code, out, err = cli(*args)
    assert code == 0, f"exit {code}: {err or out}"
    return out


def register_cnn(name: str, cnn: object, *extra: str | Path, calibration: Path | None = None) -> str:
    return ok(
        "register", name,
        "--source", f"torch:{cnn.factory}:make_model",  # type: ignore[attr-defined]
        "--weights", cnn.weights,  # type: ignore[attr-defined]
        "--input", "x: float32[-1,1,8,8]", "--task", "classification",
        "--eval", cnn.eval,  # type: ignore[attr-defined]
        "--calibration", calibration or cnn.calibration,  # type: ignore[attr-defined]
        *extra,
    )  # fmt: skip
