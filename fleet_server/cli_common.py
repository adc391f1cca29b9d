"""What the three ``edgefleet-server`` command sets share: the core commands (``fleet_server.cli``),
``rollout ...`` (``fleet_server.rollouts.cli``) and ``drift`` / ``telemetry ...``
(``fleet_server.telemetry.cli``).

The data directory option and its settings, a database transaction per command, the audit actor,
JSON and table output, duration options (:mod:`fleet_server.durations`) and the error rule: a
domain error, a settings error or a database that cannot be reached ends the command with one
``error: ...`` line on stderr and exit code 1, never a traceback. The sub-command modules import
this module, never ``fleet_server.cli`` (which imports them to register their commands once).
"""

from __future__ import annotations

import getpass
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from bundles.errors import EdgeFleetError
from fleet_server.db import make_engine, make_session_factory, session_scope
from fleet_server.durations import MAX_DURATION_S, parse_duration_s, parse_whole_seconds
from fleet_server.settings import Settings, load_settings

console = Console()
T = TypeVar("T")
DataDir = Annotated[Path | None, typer.Option("--data-dir", envvar="EDGEFLEET_DATA_DIR", help="Data directory.")]
JsonOut = Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")]


def actor() -> str:
    """How the audit log names a CLI user."""
    return f"cli:{getpass.getuser()}"


def fail(message: str) -> NoReturn:
    """Print one readable line to stderr and exit 1."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(1)


def guarded(action: Callable[[], T]) -> T:
    """Run ``action``; domain, settings and database errors become one line and exit code 1."""
    try:
        return action()
    except EdgeFleetError as error:
        fail(str(error))
    except ValidationError as error:
        fail("; ".join(f"{'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg']}" for e in error.errors()))
    except SQLAlchemyError as error:
        fail(f"database: {_first_line(error)}")


def _first_line(error: SQLAlchemyError) -> str:
    """The driver's message without SQLAlchemy's statement echo and background link."""
    cause = getattr(error, "orig", None) or error
    return (str(cause).strip().splitlines() or [type(cause).__name__])[0]


def settings_for(data_dir: Path | None) -> Settings:
    """Load the settings of a data directory (environment first, then ``server.env``)."""
    return guarded(lambda: load_settings(data_dir))


@contextmanager
def db_session(data_dir: Path | None) -> Iterator[tuple[Session, Settings]]:
    """A transaction on the server database, committed at the end of the block; errors end the command."""
    settings = settings_for(data_dir)
    engine = make_engine(settings.resolved_database_url)
    try:
        with session_scope(make_session_factory(engine)) as session:
            yield session, settings
    except EdgeFleetError as error:
        fail(str(error))
    except SQLAlchemyError as error:
        fail(f"database: {_first_line(error)}")
    finally:
        engine.dispose()


def duration_s(option: str, text: str, max_s: float = MAX_DURATION_S) -> float:
    """The seconds of a duration option (``500ms`` to ``2w``); a bad one ends the command naming the option."""
    return _named(option, lambda: parse_duration_s(text, max_s))


def whole_seconds(option: str, text: str, min_s: int = 1, max_s: int = int(MAX_DURATION_S)) -> int:
    """:func:`duration_s` for an option stored in whole seconds between ``min_s`` and ``max_s``."""
    return _named(option, lambda: parse_whole_seconds(text, min_s, max_s))


def _named(option: str, parse: Callable[[], T]) -> T:
    try:
        return parse()
    except EdgeFleetError as error:
        fail(f"{option}: {error}")


def print_json(data: Any) -> None:
    """``data`` as indented JSON on stdout (dates and other non-JSON values as strings)."""
    console.print_json(json.dumps(data, default=str))


def print_rows(rows: list[dict[str, Any]], columns: list[str], as_json: bool, title: str = "") -> None:
    """A rich table of ``columns`` (or the full rows as JSON)."""
    if as_json:
        print_json(rows)
        return
    table = Table(title=title or None)
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*("" if row.get(c) is None else str(row.get(c)) for c in columns))
    console.print(table)
