"""What the three ``edgefleet-server`` command sets share: one duration grammar, one-line errors, one
registration of each command, and no import circle between ``fleet_server.cli`` and its sub-CLIs."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bundles.errors import ConfigError
from fleet_server.cli import app
from fleet_server.durations import parse_duration_s, parse_whole_seconds

ROOT = Path(__file__).resolve().parents[2]
SETTINGS = ("MODE", "TOKEN_PEPPER", "PUBLIC_URL", "DATABASE_URL", "DATA_DIR")
CLEAN_ENV: dict[str, str | None] = {f"EDGEFLEET_{name}": None for name in SETTINGS}
runner = CliRunner()


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("500ms", 0.5), ("45s", 45), ("30m", 1800), ("1.5h", 5400), ("7d", 604_800), ("2w", 1_209_600),
     ("90", 90), (" 2 H ", 7200), ("0s", 0), (12, 12), (0.25, 0.25), ("366d", 366 * 86_400)],
)  # fmt: skip
def test_durations_accept_ms_to_w_and_plain_seconds(text, seconds):
    assert parse_duration_s(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    ("text", "message"),
    [("", "not a number with an optional unit ms, s, m, h, d or w"), ("m", "optional unit"),
     ("soon", "'soon'"), ("30 minutes", "optional unit"), ("-5s", "optional unit"), ("1y", "optional unit"),
     ("1e3", "optional unit"), ("nan", "optional unit"), (True, "optional unit"), (-1, "zero or positive"),
     (float("inf"), "zero or positive"), ("367d", "over the limit of 366d"), ("53w", "over the limit")],
)  # fmt: skip
def test_bad_durations_are_refused_naming_the_text(text, message):
    with pytest.raises(ConfigError, match="duration") as refused:
        parse_duration_s(text)
    assert message in str(refused.value)


def test_whole_seconds_refuse_fractions_and_keep_their_bounds():
    assert parse_whole_seconds("2m", min_s=5, max_s=86_400) == 120
    with pytest.raises(ConfigError, match="not a whole number of seconds"):
        parse_whole_seconds("1500ms")
    with pytest.raises(ConfigError, match="under the minimum of 5s"):
        parse_whole_seconds("2s", min_s=5)
    with pytest.raises(ConfigError, match="over the limit of 1d"):
        parse_whole_seconds("25h", max_s=86_400)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """One initialised SQLite data directory for every error case below (they change nothing)."""
    directory = tmp_path_factory.mktemp("cli") / "srv"
    result = runner.invoke(app, ["init", "--data-dir", str(directory), "--public-url", "https://fleet.example"],
                           env=CLEAN_ENV)  # fmt: skip
    assert result.exit_code == 0, result.output
    return directory


def assert_one_line_error(result, *fragments: str) -> None:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1, result.output
    assert result.output.startswith("error: ") and all(f in result.output for f in fragments), result.output


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        # core commands
        (["enroll-token", "create", "--fleet", "lab", "--expires", "soon"], ["--expires", "duration 'soon'"]),
        (["enroll-token", "create", "--fleet", "lab", "--expires", "30s"], ["--expires", "under the minimum of 1m"]),
        (["groups", "create", "lab", "--poll-interval", "1500ms"], ["--poll-interval", "whole number of seconds"]),
        (["groups", "set-poll", "lab", "2d"], ["interval", "over the limit of 1d"]),
        (["devices", "approve", "dev-nope"], ["does not exist"]),
        # rollout ...
        (["rollout", "create", "digits@1", "--to", "all", "--soak", "2y"], ["--soak", "duration '2y'"]),
        (["rollout", "create", "digits@1", "--to", "all", "--jitter", "400d"], ["--jitter", "over the limit"]),
        (["rollout", "create", "digits", "--to", "all"], ["NAME@VERSION"]),
        (["rollout", "show", "999"], ["999"]),
        # drift and telemetry ...
        (["drift", "tiny", "--since", "yesterday"], ["--since", "duration 'yesterday'"]),
        (["telemetry", "summary", "tiny", "--since", "-1h"], ["--since", "duration '-1h'"]),
        (["telemetry", "monitor", "tiny", "--lookback", "100d"], ["--lookback", "over the limit of 90d"]),
        (["telemetry", "monitor", "tiny", "--lookback", "0.5s"], ["--lookback", "whole number of seconds"]),
    ],
)
def test_each_cli_answers_bad_input_with_one_line_and_exit_1(data_dir, args, fragments):
    result = runner.invoke(app, [*args, "--data-dir", str(data_dir)], env=CLEAN_ENV)
    assert_one_line_error(result, *fragments)


@pytest.mark.parametrize("args", [["api-keys", "list"], ["rollout", "list"], ["telemetry", "alerts"]])
def test_each_cli_reports_an_unreachable_database_in_one_line(data_dir, args):
    env = {**CLEAN_ENV, "EDGEFLEET_DATABASE_URL": "postgresql://edgefleet@127.0.0.1:1/nowhere"}
    result = runner.invoke(app, [*args, "--data-dir", str(data_dir)], env=env)
    assert_one_line_error(result, "error: database: ", "127.0.0.1")


def test_every_command_and_command_set_is_registered_once():
    groups = [group.name for group in app.registered_groups]
    commands = [command.name or command.callback.__name__ for command in app.registered_commands]
    assert sorted(groups) == sorted(set(groups)) and {"rollout", "telemetry"} <= set(groups)
    assert sorted(commands) == sorted(set(commands)) and "drift" in commands
    for group in app.registered_groups:
        names = [c.name or c.callback.__name__ for c in group.typer_instance.registered_commands]
        assert sorted(names) == sorted(set(names)), group.name


def test_no_module_of_the_server_imports_the_core_cli():
    """The sub-CLIs take the shared pieces from ``fleet_server.cli_common``: ``fleet_server.cli``
    imports them to register their commands, so an import back would be a circle."""
    importers = []
    for path in sorted((ROOT / "fleet_server").rglob("*.py")):
        if path == ROOT / "fleet_server" / "cli.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            if "fleet_server.cli" in names:
                importers.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert importers == []
