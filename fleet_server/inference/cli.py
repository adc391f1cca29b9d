"""``edgefleet-server inference`` and ``edgefleet-server batch-predict``.

    edgefleet-server inference --models digits@3 --port 8090 --workers 2
    edgefleet-server batch-predict digits@3 --input rows.parquet --output scored.parquet

:func:`register` adds both to the core CLI app (one line in ``fleet_server/cli.py``). Errors print one
line and exit 1, like every ``edgefleet-server`` command.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

import typer

DataDir = Annotated[Path | None, typer.Option("--data-dir", envvar="EDGEFLEET_DATA_DIR", help="Data directory.")]


def register(core: typer.Typer) -> None:
    """Add ``inference`` and ``batch-predict`` to the core ``edgefleet-server`` app."""
    core.command("inference")(inference)
    core.command("batch-predict")(batch_predict)


def inference(
    data_dir: DataDir = None,
    models: Annotated[
        list[str] | None,
        typer.Option("--models", help="name@version (or name) to load at start; repeat or comma-separate."),
    ] = None,
    host: Annotated[str | None, typer.Option(help="Bind address (default EDGEFLEET_INFERENCE_HOST).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default EDGEFLEET_INFERENCE_PORT, 8090).")] = None,
    workers: Annotated[
        int | None, typer.Option(min=1, help="Worker processes (default EDGEFLEET_INFERENCE_WORKERS).")
    ] = None,
    loading: Annotated[str | None, typer.Option(help="lazy (load on first request) or eager (load at start).")] = None,
    batching: Annotated[bool | None, typer.Option("--batching/--no-batching", help="Dynamic batching.")] = None,
) -> None:
    """Serve the Open Inference Protocol (KServe v2) over the fleet's signed bundles (docs/inference.md)."""
    import uvicorn

    from fleet_server import cli_common as core
    from fleet_server.inference.settings import load_inference_settings

    overrides: dict[str, Any] = {"host": host, "port": port, "workers": workers, "loading": loading,
                                 "batching": batching}  # fmt: skip
    if models:
        overrides["models"] = [m.strip() for item in models for m in item.split(",") if m.strip()]
    configured = core.guarded(lambda: load_inference_settings(data_dir, **overrides))
    core.guarded(lambda: _check_database(configured.server.resolved_database_url))
    os.environ["EDGEFLEET_DATA_DIR"] = str(configured.server.data_dir)
    for key, value in overrides.items():  # every worker process reads the same settings
        if value is not None:
            os.environ[f"EDGEFLEET_INFERENCE_{key.upper()}"] = _env_value(value)
    settings = configured.inference
    if settings.workers > 1:  # every worker writes its metrics there; /metrics sums them
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(_fresh_dir(configured.cache_dir / "metrics"))
    uvicorn.run("fleet_server.inference.cli:build_app", factory=True, host=settings.host, port=settings.port,
                workers=settings.workers, log_config=None, access_log=False)  # fmt: skip


def _env_value(value: Any) -> str:
    import json

    if isinstance(value, list):
        return json.dumps(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _fresh_dir(path: Path) -> Path:
    import shutil

    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True, mode=0o700)
    return path


def _check_database(url: str) -> None:
    """Bring the schema to the newest revision first, as ``edgefleet-server run`` does."""
    from fleet_server.db import upgrade_database

    upgrade_database(url)


def build_app() -> Any:
    """The app of one worker (a factory so that each uvicorn worker builds its own)."""
    from fleet_server.inference.app import create_inference_app
    from fleet_server.inference.settings import load_inference_settings

    return create_inference_app(load_inference_settings())


def batch_predict(
    ref: Annotated[str, typer.Argument(help="The bundle: NAME@VERSION.")],
    input_path: Annotated[Path, typer.Option("--input", help="Rows to score: .parquet or .npz.")],
    output_path: Annotated[Path, typer.Option("--output", help="Where the scores go (same format as the input).")],
    data_dir: DataDir = None,
    chunk_rows: Annotated[int, typer.Option(min=1, help="Rows per model call and per resumable chunk.")] = 1024,
) -> None:
    """Score a file with the same verified bundle and Predictor as the devices, in resumable chunks."""
    from fleet_server import cli_common as core
    from fleet_server.inference.batch import run_batch_predict
    from fleet_server.inference.settings import load_inference_settings

    configured = core.guarded(lambda: load_inference_settings(data_dir))
    summary = core.guarded(lambda: run_batch_predict(configured, ref, input_path, output_path, chunk_rows))
    typer.echo(
        f"{summary.rows} rows scored into {output_path} ({summary.failed} failed, {summary.resumed_chunks} chunks "
        "resumed from an earlier run)"
    )
    for index, error in summary.errors[:20]:
        typer.echo(f"row {index}: {error}", err=True)
    if summary.failed > 20:
        typer.echo(f"... and {summary.failed - 20} more failed rows (see the 'error' column)", err=True)
