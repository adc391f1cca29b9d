"""``edgefleet-server``: set up, run and administer a fleet server from its host.

Admin commands work directly on the database of the data directory (the same settings as ``run``:
``EDGEFLEET_*`` environment variables and ``<data-dir>/server.env``), and every change is written to
the audit log with the actor ``cli:<unix user>``. Errors print one readable line and exit non-zero.

This module holds the core commands and registers, once, the command sets of the rollouts
(``rollout ...``) and telemetry (``drift``, ``telemetry ...``) subpackages; what all three share
(data directory, sessions, output, durations, errors) is in :mod:`fleet_server.cli_common`, which
the subpackages import instead of this module.
"""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Annotated, Any

import typer
from sqlalchemy import select

from fleet_server.cli_common import (
    DataDir,
    JsonOut,
    actor,
    console,
    db_session,
    fail,
    guarded,
    print_json,
    print_rows,
    settings_for,
    whole_seconds,
)
from fleet_server.db import make_engine, make_session_factory, session_scope, upgrade_database
from fleet_server.inference import cli as inference_cli
from fleet_server.rollouts import cli as rollouts_cli
from fleet_server.schemas import ENROLL_TOKEN_LIFETIME_S
from fleet_server.settings import ENV_FILE_NAME, Settings, load_settings
from fleet_server.telemetry import cli as telemetry_cli

app = typer.Typer(help="Run and administer an edgefleet fleet server.", no_args_is_help=True, add_completion=False)
api_keys_app = typer.Typer(help="Admin API keys (roles: admin, operator, viewer).", no_args_is_help=True)
tokens_app = typer.Typer(help="Fleet enrollment tokens.", no_args_is_help=True)
devices_app = typer.Typer(help="Enrolled devices.", no_args_is_help=True)
groups_app = typer.Typer(help="Static device groups (with poll interval overrides).", no_args_is_help=True)
filters_app = typer.Typer(help="Saved device filters.", no_args_is_help=True)
bundles_app = typer.Typer(help="Published bundles.", no_args_is_help=True)
tuf_app = typer.Typer(help="The hosted TUF repository.", no_args_is_help=True)
for sub, name in (
    (api_keys_app, "api-keys"),
    (tokens_app, "enroll-token"),
    (devices_app, "devices"),
    (groups_app, "groups"),
    (filters_app, "filters"),
    (bundles_app, "bundles"),
    (tuf_app, "tuf"),
    (rollouts_cli.app, "rollout"),
    (telemetry_cli.app, "telemetry"),
):
    app.add_typer(sub, name=name)  # fmt: skip
app.command("drift")(telemetry_cli.drift)
inference_cli.register(app)

POLL_INTERVAL_S = (1, 86_400)
"""A group's poll interval override from the host: down to 1 s (the demo polls every 2 s), where the API
keeps remote admins at 5 s or more."""


def main() -> None:
    """Console-script entry point."""
    app()


# --- init and run ----------------------------------------------------------------------------------


def write_env_file(path: Path, values: dict[str, str]) -> None:
    """Write ``KEY=value`` lines (mode 0600), keeping keys already present in the file."""
    existing: dict[str, str] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            key, sep, value = line.partition("=")
            if sep and not line.lstrip().startswith("#"):
                existing[key.strip()] = value.strip()
    merged = {**values, **existing}
    path.touch(mode=0o600, exist_ok=True)
    path.chmod(0o600)
    path.write_text("".join(f"{k}={v}\n" for k, v in sorted(merged.items())))


@app.command()
def init(
    data_dir: DataDir = None,
    public_url: Annotated[str | None, typer.Option(help="URL devices use to reach this server (https).")] = None,
    database_url: Annotated[
        str | None, typer.Option(help="postgresql://... (default: SQLite in the data dir).")
    ] = None,
    dev: Annotated[
        bool, typer.Option("--dev", help="Dev mode: allow plain HTTP and warn instead of refusing.")
    ] = False,
    admin_name: Annotated[str, typer.Option(help="Name of the first admin API key.")] = "admin",
) -> None:
    """Create the data directory, migrate the database, make the online TUF keys and the first admin key."""
    directory = (data_dir or Path("./edgefleet-data")).resolve()
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    values = {"EDGEFLEET_TOKEN_PEPPER": secrets.token_urlsafe(32)}
    values.update({k: v for k, v in (("EDGEFLEET_PUBLIC_URL", public_url), ("EDGEFLEET_DATABASE_URL", database_url),
                                     ("EDGEFLEET_MODE", "dev" if dev else None)) if v})  # fmt: skip
    write_env_file(directory / ENV_FILE_NAME, values)
    settings = settings_for(directory)
    guarded(lambda: upgrade_database(settings.resolved_database_url))
    from fleet_server.services.tuf_host import TufHost

    guarded(TufHost(settings).create_online_keys)
    console.print(f"data directory  {directory}")
    console.print(f"database        {settings.resolved_database_url} (migrated)")
    console.print(f"online TUF keys {settings.keys_dir}")
    _create_first_admin_key(settings, admin_name)


def _create_first_admin_key(settings: Settings, name: str) -> None:
    from fleet_server.models import ApiKey
    from fleet_server.services.api_keys import create_api_key

    engine = make_engine(settings.resolved_database_url)
    try:
        with session_scope(make_session_factory(engine)) as session:
            if session.scalar(select(ApiKey.id).where(ApiKey.role == "admin", ApiKey.revoked_at.is_(None))):
                console.print("an admin API key already exists; create more with 'api-keys create'")
                return
            _, secret = create_api_key(session, name=name, role="admin", actor=actor(), pepper=settings.token_pepper)
    finally:
        engine.dispose()
    console.print(f"admin API key   {secret}", markup=False, highlight=False)
    console.print("(shown once: store it now)")


@app.command()
def run(
    data_dir: DataDir = None,
    host: Annotated[str | None, typer.Option(help="Bind address (default from settings).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default from settings).")] = None,
    workers: Annotated[
        int, typer.Option(min=1, help="Worker processes; one of them runs the background tasks (docs/server.md).")
    ] = 1,
) -> None:
    """Serve the API with uvicorn (the database is migrated to the newest schema first)."""
    import os

    import uvicorn

    settings = settings_for(data_dir)
    guarded(lambda: upgrade_database(settings.resolved_database_url))
    os.environ["EDGEFLEET_DATA_DIR"] = str(settings.data_dir)
    if workers > 1:  # every worker writes its metrics here; /metrics sums them (fleet_server.observability)
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(fresh_metrics_dir(settings.data_dir))
    uvicorn.run("fleet_server.cli:build_app", factory=True, host=host or settings.host, port=port or settings.port,
                workers=workers, log_config=None, access_log=False)  # fmt: skip


def fresh_metrics_dir(data_dir: Path) -> Path:
    """An empty ``metrics/`` in the data directory (values of an earlier run would be summed in otherwise)."""
    import shutil

    path = data_dir / "metrics"
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True, mode=0o700)
    return path


def build_app() -> Any:
    """The app for ``run`` (a factory so that each uvicorn worker builds its own)."""
    from fleet_server.app import create_app

    return create_app(load_settings())


# --- API keys --------------------------------------------------------------------------------------


@api_keys_app.command("create")
def api_keys_create(
    name: Annotated[str, typer.Option(help="Who or what uses the key.")],
    role: Annotated[str, typer.Option(help="admin, operator or viewer.")] = "viewer",
    data_dir: DataDir = None,
) -> None:
    """Create an API key; the secret is printed once."""
    from fleet_server.services.api_keys import create_api_key

    with db_session(data_dir) as (session, settings):
        key, secret = create_api_key(session, name=name, role=role, actor=actor(), pepper=settings.token_pepper)
    console.print(f"API key {key.id} ({role}): {secret}", markup=False, highlight=False)


@api_keys_app.command("list")
def api_keys_list(data_dir: DataDir = None, as_json: JsonOut = False) -> None:
    """List API keys (never their secrets)."""
    from fleet_server.services.api_keys import describe_api_key, list_api_keys

    with db_session(data_dir) as (session, _):
        rows = [describe_api_key(k) for k in list_api_keys(session)]
    print_rows(rows, ["id", "name", "role", "prefix", "created_at", "revoked_at", "last_used_at"], as_json)


@api_keys_app.command("revoke")
def api_keys_revoke(key_id: int, data_dir: DataDir = None) -> None:
    """Revoke an API key."""
    from fleet_server.services.api_keys import revoke_api_key

    with db_session(data_dir) as (session, _):
        revoke_api_key(session, key_id=key_id, actor=actor())
    console.print(f"API key {key_id} revoked")


# --- enrollment tokens -----------------------------------------------------------------------------


@tokens_app.command("create")
def enroll_token_create(
    fleet: Annotated[str, typer.Option(help="Fleet the enrolled devices join.")],
    expires: Annotated[str, typer.Option(help="Lifetime: 7d, 12h, 30m.")] = "7d",
    max_uses: Annotated[int | None, typer.Option(help="How many devices may use it (default unlimited).")] = None,
    data_dir: DataDir = None,
) -> None:
    """Create a fleet enrollment token; the secret is printed once."""
    from fleet_server.services.enroll_tokens import create_enroll_token

    expires_in_s = whole_seconds("--expires", expires, *ENROLL_TOKEN_LIFETIME_S)
    with db_session(data_dir) as (session, settings):
        token, secret = create_enroll_token(session, fleet=fleet, expires_in_s=expires_in_s, max_uses=max_uses,
                                            actor=actor(), pepper=settings.token_pepper)  # fmt: skip
    console.print(f"enrollment token for fleet {fleet} (expires {token.expires_at.isoformat()}):")
    console.print(secret, markup=False, highlight=False)


@tokens_app.command("list")
def enroll_token_list(data_dir: DataDir = None, as_json: JsonOut = False) -> None:
    """List enrollment tokens."""
    from fleet_server.services.enroll_tokens import describe_token, list_enroll_tokens

    with db_session(data_dir) as (session, _):
        rows = [describe_token(t) for t in list_enroll_tokens(session)]
    print_rows(rows, ["id", "fleet", "prefix", "expires_at", "uses", "max_uses", "revoked_at"], as_json)


@tokens_app.command("revoke")
def enroll_token_revoke(token_id: int, data_dir: DataDir = None) -> None:
    """Revoke an enrollment token."""
    from fleet_server.services.enroll_tokens import revoke_enroll_token

    with db_session(data_dir) as (session, _):
        revoke_enroll_token(session, token_id=token_id, actor=actor())
    console.print(f"enrollment token {token_id} revoked")


# --- devices ---------------------------------------------------------------------------------------


@devices_app.command("list")
def devices_list(
    filter_expr: Annotated[str, typer.Option("--filter", help="e.g. 'hw=pi4 and runtime=onnxruntime>=1.20'")] = "",
    saved: Annotated[str | None, typer.Option(help="Use a saved filter by name.")] = None,
    data_dir: DataDir = None,
    as_json: JsonOut = False,
) -> None:
    """List devices, optionally filtered."""
    from fleet_server.services import fleet

    with db_session(data_dir) as (session, _):
        expression = fleet.get_filter(session, saved).expression if saved else filter_expr
        rows = fleet.list_devices(session, expression, limit=100_000)
    for row in rows:
        row["runtimes"] = ",".join(f"{k}={v}" for k, v in (row["capabilities"].get("runtimes") or {}).items())
        row["tags"] = ",".join(row["tags"])
    print_rows(rows, ["id", "fleet", "status", "hw_class", "arch", "runtimes", "tags", "last_seen_at"], as_json,
               title=f"{len(rows)} device(s)")  # fmt: skip


@devices_app.command("show")
def devices_show(device_id: str, data_dir: DataDir = None) -> None:
    """Show one device as JSON."""
    from fleet_server.services import fleet

    with db_session(data_dir) as (session, _):
        detail = fleet.device_detail(session, device_id)
    print_json(detail)


def _device_status(action: str, device_id: str, data_dir: Path | None) -> None:
    from fleet_server.services.devices import change_status

    with db_session(data_dir) as (session, _):
        device = change_status(session, device_id=device_id, action=action, actor=actor())
        status = device.status
    console.print(f"device {device_id} is now {status}")


@devices_app.command("approve")
def devices_approve(device_id: str, data_dir: DataDir = None) -> None:
    """Accept a pending device."""
    _device_status("approve", device_id, data_dir)


@devices_app.command("reject")
def devices_reject(device_id: str, data_dir: DataDir = None) -> None:
    """Reject a device (revokes its access token)."""
    _device_status("reject", device_id, data_dir)


@devices_app.command("decommission")
def devices_decommission(device_id: str, data_dir: DataDir = None) -> None:
    """Retire a device for good (revokes its access token)."""
    _device_status("decommission", device_id, data_dir)


@devices_app.command("tag")
def devices_tag(
    device_id: str,
    add: Annotated[list[str] | None, typer.Option("--add", help="Tag to add (repeatable).")] = None,
    remove: Annotated[list[str] | None, typer.Option("--remove", help="Tag to remove (repeatable).")] = None,
    data_dir: DataDir = None,
) -> None:
    """Add or remove device tags."""
    from fleet_server.services.devices import device_tags, set_tags

    with db_session(data_dir) as (session, _):
        set_tags(session, device_id=device_id, add=add or [], remove=remove or [], actor=actor())
        tags = device_tags(session, device_id)
    console.print(f"device {device_id} tags: {', '.join(tags) or '(none)'}")


# --- groups and filters ----------------------------------------------------------------------------


@groups_app.command("list")
def groups_list(data_dir: DataDir = None, as_json: JsonOut = False) -> None:
    """List groups."""
    from fleet_server.services import fleet

    with db_session(data_dir) as (session, _):
        rows = [fleet.describe_group(session, g) for g in fleet.list_groups(session)]
    print_rows(rows, ["name", "members", "poll_interval_s", "description"], as_json)


@groups_app.command("create")
def groups_create(
    name: str,
    description: Annotated[str, typer.Option(help="What the group is for.")] = "",
    poll_interval: Annotated[str | None, typer.Option(help="Poll interval override for members (e.g. 60s).")] = None,
    data_dir: DataDir = None,
) -> None:
    """Create a static group."""
    from fleet_server.services import fleet

    poll_s = whole_seconds("--poll-interval", poll_interval, *POLL_INTERVAL_S) if poll_interval else None
    with db_session(data_dir) as (session, _):
        fleet.create_group(session, name=name, description=description, poll_interval_s=poll_s, actor=actor())
    console.print(f"group {name} created")


@groups_app.command("set-poll")
def groups_set_poll(
    name: str,
    interval: Annotated[str | None, typer.Argument(help="New interval (e.g. 60s); omit with --clear.")] = None,
    clear: Annotated[bool, typer.Option("--clear", help="Remove the override.")] = False,
    data_dir: DataDir = None,
) -> None:
    """Set or clear a group's poll interval override."""
    from fleet_server.services import fleet

    if interval is None and not clear:
        fail("give an interval or --clear")
    poll_s = whole_seconds("interval", interval, *POLL_INTERVAL_S) if interval else None
    with db_session(data_dir) as (session, _):
        changes = {"poll_interval_s": poll_s, "clear_poll_interval": clear}
        fleet.update_group(session, name=name, changes=changes, actor=actor())
    console.print(f"group {name} poll interval: {'default' if clear else f'{poll_s} s'}")


@groups_app.command("add")
def groups_add(name: str, device_ids: list[str], data_dir: DataDir = None) -> None:
    """Add devices to a group."""
    from fleet_server.services import fleet

    with db_session(data_dir) as (session, _):
        fleet.change_members(session, name=name, add=device_ids, remove=[], actor=actor())
    console.print(f"added {len(device_ids)} device(s) to {name}")


@groups_app.command("remove")
def groups_remove(name: str, device_ids: list[str], data_dir: DataDir = None) -> None:
    """Remove devices from a group."""
    from fleet_server.services import fleet

    with db_session(data_dir) as (session, _):
        fleet.change_members(session, name=name, add=[], remove=device_ids, actor=actor())
    console.print(f"removed {len(device_ids)} device(s) from {name}")


@groups_app.command("delete")
def groups_delete(name: str, data_dir: DataDir = None) -> None:
    """Delete a group (its devices stay enrolled)."""
    from fleet_server.services import fleet

    with db_session(data_dir) as (session, _):
        fleet.delete_group(session, name=name, actor=actor())
    console.print(f"group {name} deleted")


@filters_app.command("save")
def filters_save(name: str, expression: str, data_dir: DataDir = None) -> None:
    """Save a named device filter."""
    from fleet_server.services import fleet

    with db_session(data_dir) as (session, _):
        fleet.save_filter(session, name=name, expression=expression, actor=actor())
    console.print(f"filter {name} saved")


@filters_app.command("list")
def filters_list(data_dir: DataDir = None, as_json: JsonOut = False) -> None:
    """List saved filters."""
    from fleet_server.models import SavedFilter

    with db_session(data_dir) as (session, _):
        rows = [{"name": f.name, "expression": f.expression} for f in session.scalars(select(SavedFilter))]
    print_rows(rows, ["name", "expression"], as_json)


@filters_app.command("delete")
def filters_delete(name: str, data_dir: DataDir = None) -> None:
    """Delete a saved filter."""
    from fleet_server.services import fleet

    with db_session(data_dir) as (session, _):
        fleet.delete_filter(session, name=name, actor=actor())
    console.print(f"filter {name} deleted")


# --- bundles ---------------------------------------------------------------------------------------


@bundles_app.command("list")
def bundles_list(
    name: Annotated[str | None, typer.Option(help="Only this bundle name.")] = None,
    data_dir: DataDir = None,
    as_json: JsonOut = False,
) -> None:
    """List published bundles."""
    from fleet_server.services import registry

    with db_session(data_dir) as (session, _):
        rows = [registry.describe_bundle(b) for b in registry.list_bundles(session, name)]
    for row in rows:
        row["variant_ids"] = ",".join(v["id"] for v in row["variants"])
    print_rows(rows, ["name", "version", "variant_ids", "size_bytes", "deprecated", "created_at"], as_json)


@bundles_app.command("show")
def bundles_show(name: str, version: int, data_dir: DataDir = None) -> None:
    """Show a bundle version with its manifest (JSON)."""
    from fleet_server.services import registry

    with db_session(data_dir) as (session, _):
        detail = registry.describe_bundle(registry.get_bundle(session, name, version), with_manifest=True)
    print_json(detail)


@bundles_app.command("deprecate")
def bundles_deprecate(
    name: str, version: int, undo: Annotated[bool, typer.Option("--undo")] = False, data_dir: DataDir = None
) -> None:
    """Mark a bundle version deprecated (or undo it)."""
    from fleet_server.services import registry

    with db_session(data_dir) as (session, _):
        registry.set_deprecated(session, name=name, version=version, deprecated=not undo, actor=actor())
    console.print(f"bundle {name}@{version} {'un' if undo else ''}deprecated")


@bundles_app.command("delete")
def bundles_delete(name: str, version: int, data_dir: DataDir = None) -> None:
    """Delete a bundle record (refused while an assignment, rollout or device uses it)."""
    from fleet_server.services import registry

    with db_session(data_dir) as (session, _):
        registry.delete_bundle(session, name=name, version=version, actor=actor())
    console.print(f"bundle {name}@{version} deleted")


# --- TUF and audit ---------------------------------------------------------------------------------


@tuf_app.command("install-root")
def tuf_install_root(root_file: Path, data_dir: DataDir = None) -> None:
    """Install root.json version 1 (or a rotation to N+1) from a file made by 'edgefleet-convert keys'."""
    from fleet_server.api.bundles import record_root_change
    from fleet_server.services.tuf_host import TufHost

    if not root_file.is_file():
        fail(f"{root_file} does not exist")
    host = TufHost(settings_for(data_dir))
    before = guarded(host.trusted_root)
    version = guarded(lambda: host.install_root(root_file.read_bytes()))
    with db_session(data_dir) as (session, _):
        record_root_change(session, actor(), before, host.trusted_root())
    console.print(f"root version {version} installed")


@tuf_app.command("refresh")
def tuf_refresh(data_dir: DataDir = None) -> None:
    """Re-sign timestamp (and snapshot) now if they are close to expiry (the server also does this itself)."""
    from fleet_server.services.tuf_host import TufHost

    guarded(TufHost(settings_for(data_dir)).refresh)
    console.print("TUF timestamp checked and refreshed if due")


@app.command()
def audit(
    limit: Annotated[int, typer.Option(min=1, help="How many entries.")] = 50,
    data_dir: DataDir = None,
    as_json: JsonOut = False,
) -> None:
    """Show the newest audit log entries."""
    from fleet_server.models import AuditEntry

    with db_session(data_dir) as (session, _):
        entries = session.scalars(select(AuditEntry).order_by(AuditEntry.id.desc()).limit(limit))
        rows = [{"at": e.at.isoformat(), "actor": e.actor, "action": e.action, "target": e.target_id,
                 "before": e.before, "after": e.after} for e in entries]  # fmt: skip
    print_rows(rows, ["at", "actor", "action", "target"], as_json)


if __name__ == "__main__":  # pragma: no cover
    main()
