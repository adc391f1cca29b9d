"""``edgefleet-agent``: enroll the device, run the daemon, show its status.

    edgefleet-agent enroll --server https://fleet.example.com --token T
    edgefleet-agent run                 # the daemon (what the systemd unit starts)
    edgefleet-agent status [--json]     # active/previous bundle, last update, health, queue

argparse only (the device has no typer or rich). Errors print one readable line and exit non-zero:
1 for a runtime failure, 2 for bad usage or configuration.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from bundles.errors import ConfigError, EdgeFleetError
from device_agent.version import AGENT_VERSION


def _out(text: str) -> None:
    sys.stdout.write(text + "\n")


def _err(text: str) -> None:
    sys.stderr.write(text + "\n")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgefleet-agent", description="edgefleet device agent")
    parser.add_argument("--config", help="agent TOML (default: $EDGEFLEET_AGENT_CONFIG or /etc/edgefleet/agent.toml)")
    parser.add_argument("--state-dir", help="override state_dir (keys, slots, telemetry)")
    parser.add_argument("--version", action="version", version=f"edgefleet-agent {AGENT_VERSION}")
    sub = parser.add_subparsers(dest="command", required=True)
    enroll = sub.add_parser("enroll", help="generate the device key and enroll with a fleet server")
    enroll.add_argument("--server", required=True, help="fleet server base URL, e.g. https://fleet.example.com")
    enroll.add_argument("--token", required=True, help="the fleet's enrollment token")
    enroll.add_argument(
        "--root",
        help="TUF root.json shipped with the device image: trusted instead of the root the server sends, so "
        "even a server compromised at enrollment cannot make the device trust keys the release root did not sign",
    )
    run = sub.add_parser("run", help="run the daemon: updates, local inference API, telemetry")
    run.add_argument("--once", action="store_true", help="one update round, then exit")
    run.add_argument("--no-http", action="store_true", help="do not serve the localhost inference API")
    run.add_argument("--port", type=int, help="override http_port")
    status = sub.add_parser("status", help="show installed bundles, last update, health and queue")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    return parser


def _config(args: argparse.Namespace) -> Any:
    from device_agent.config import load_config

    return load_config(args.config, state_dir=args.state_dir, http_port=getattr(args, "port", None))


def cmd_enroll(args: argparse.Namespace) -> int:
    from device_agent.capabilities import device_capabilities
    from device_agent.client import FleetClient
    from device_agent.identity import load_or_create_key

    config = _config(args)
    pinned_root = _read_root_file(args.root) if args.root else None
    config.ensure_state_dir()
    key = load_or_create_key(config.identity_dir)
    caps = device_capabilities(config)
    inventory = {"capabilities": caps.to_dict(), "installed": [], "agent_version": AGENT_VERSION}
    client = FleetClient(args.server, timeout_s=config.request_timeout_s)
    try:
        enrollment, root = client.enroll(args.token, key, inventory)
    finally:
        client.close()
    enrollment.save(config.identity_dir, pinned_root or root)
    _out(f"enrolled as {enrollment.device_id} ({enrollment.status}) with {enrollment.server_url}")
    if enrollment.status != "accepted":
        _out("an operator must accept this device before it receives bundles")
    return 0


def _read_root_file(path: str) -> dict[str, Any]:
    """A TUF root metadata file given with ``--root``; a :class:`ConfigError` if it is not one."""
    try:
        root = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"--root {path}: not a readable JSON file ({e})") from e
    signed = root.get("signed") if isinstance(root, dict) else None
    if not isinstance(signed, dict) or signed.get("_type") != "root" or "signatures" not in root:
        raise ConfigError(f"--root {path}: not a signed TUF root metadata file")
    return dict(root)


def cmd_run(args: argparse.Namespace) -> int:
    from device_agent.agent import Agent
    from device_agent.daemon import Daemon

    config = _config(args)
    logging.basicConfig(level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    agent = Agent.build(config, follow_pointers=False)
    daemon = Daemon(agent, threading.Event())

    def stop(signum: int, _frame: FrameType | None) -> None:
        logging.getLogger(__name__).info("signal %d: stopping", signum)
        daemon.request_stop()

    def poll_now(_signum: int, _frame: FrameType | None) -> None:
        daemon.wake.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGHUP, poll_now)
    daemon.run(once=args.once, http=not args.no_http and not args.once)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    config = _config(args)
    status = _live_status(config) or _disk_status(config)
    if args.json:
        _out(json.dumps(status, indent=2, sort_keys=True, default=str))
    else:
        _out(format_status(status))
    return 0 if status.get("health") == "ok" else 1


def _live_status(config: Any) -> dict[str, Any] | None:
    """Ask the running daemon (it knows the queue and what is loaded)."""
    import httpx

    try:
        response = httpx.get(f"http://{config.http_host}:{config.http_port}/edgefleet/status", timeout=2.0)
    except httpx.HTTPError:
        return None
    if response.status_code != 200:
        return None
    status: dict[str, Any] = response.json()
    status["daemon"] = "running"
    return status


def _disk_status(config: Any) -> dict[str, Any]:
    """The daemon is not answering: report what is on disk (and that it is not running)."""
    from device_agent.agent import Agent

    if not config.state_dir.exists():
        return {"agent_version": AGENT_VERSION, "daemon": "not running", "health": "no-model", "models": {},
                "device_id": None, "state_dir": f"{config.state_dir} (missing)"}  # fmt: skip

    agent = Agent.build(config, follow_pointers=True, telemetry=False, read_only=True)  # verifies, changes nothing
    try:
        status = agent.status()
    finally:
        agent.close()
    status["daemon"] = "not running"
    return status


def format_status(status: dict[str, Any]) -> str:
    """The human-readable status."""
    lines = [
        f"agent       {status.get('agent_version')} (daemon {status.get('daemon', 'unknown')})",
        f"device      {status.get('device_id') or 'not enrolled'} {status.get('server_url') or ''}".rstrip(),
        f"health      {status.get('health')}",
    ]
    for name, model in sorted(status.get("models", {}).items()):
        slots = ", ".join(f"v{s['version']} {s['variant']}{_on(s)} [{s['state']}, slot {s['slot']}]"
                          for s in model["slots"])  # fmt: skip
        lines.append(f"model       {name}: {slots or 'nothing installed'}")
    last = status.get("last_update")
    if last:
        error = f": {last['error']}" if last.get("error") else ""
        lines.append(f"last update {last['model']}@{last['version']} {last['status']}{error}")
    if status.get("update_in_progress"):
        lines.append(f"in progress {status['update_in_progress']}")
    queue = status.get("queue") or {}
    lines.append(f"queue       running {queue.get('running', 0)}, waiting {queue.get('waiting', 0)}, "
                 f"completed {queue.get('completed', 0)}, rejected {queue.get('rejected', 0)}")  # fmt: skip
    return "\n".join(lines)


def _on(slot: dict[str, Any]) -> str:
    """`` on litert 2.3.0``: the runtime the slot's variant runs on here (validated for it), when known."""
    runtime = slot.get("runtime")
    if not runtime:
        return ""
    return f" on {runtime} {slot.get('runtime_version') or ''}".rstrip()


COMMANDS = {"enroll": cmd_enroll, "run": cmd_run, "status": cmd_status}


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except ConfigError as e:
        _err(f"edgefleet-agent: error: {e}")
        return 2
    except (EdgeFleetError, OSError) as e:
        _err(f"edgefleet-agent: error: {e}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
