"""Key ceremonies from a shell: ``python -m bundles.tuf.cli keygen | rotate-root | show``.

The converter and server CLIs cover the everyday commands (``edgefleet-convert keys init``,
``edgefleet-server tuf install-root``); this small tool covers what happens rarely and must work
on a bare workstation or server with only the ``agent`` extra installed: generating a replacement
key, signing root version N+1 with the old and new root keys, and inspecting a root or a repository.
See ``docs/security.md`` for the full rotation procedure.

Errors print one line on stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tuf.api.metadata import Root

from bundles.errors import ConfigError, EdgeFleetError
from bundles.tuf import keys
from bundles.tuf.common import parse_metadata
from bundles.tuf.root import next_root


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the exit status."""
    args = _parser().parse_args(argv)
    try:
        args.run(args)
    except EdgeFleetError as e:
        sys.stderr.write(f"error: {e}\n")
        return 2
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bundles.tuf.cli", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(required=True)
    keygen = sub.add_parser("keygen", help="generate an Ed25519 key file (mode 0600) and <file>.pub.json")
    keygen.add_argument("path", type=Path)
    keygen.add_argument("--force", action="store_true", help="replace an existing key file")
    keygen.set_defaults(run=_keygen)
    rotate = sub.add_parser("rotate-root", help="sign root version N+1, by the old and the new root keys")
    rotate.add_argument("--root", type=Path, required=True, help="the current root.json")
    rotate.add_argument("--root-key", type=Path, action="append", required=True, help="a current root key file")
    rotate.add_argument("--new-root-key", type=Path, action="append", help="a new root key file (replaces all)")
    rotate.add_argument("--targets-key", action="append", help="new targets (release) key: key or .pub.json file")
    rotate.add_argument("--snapshot-key", help="new snapshot key: key or .pub.json file")
    rotate.add_argument("--timestamp-key", help="new timestamp key: key or .pub.json file")
    rotate.add_argument("--expires-days", type=float, default=365.0)
    rotate.add_argument("--out", type=Path, required=True, help="where to write the new root")
    rotate.set_defaults(run=_rotate_root)
    show = sub.add_parser("show", help="print the roles, key ids and expiry of a root.json")
    show.add_argument("root", type=Path)
    show.set_defaults(run=_show)
    return parser


def _keygen(args: argparse.Namespace) -> None:
    signer = keys.generate_key(args.path, overwrite=args.force)
    _print({"written": str(args.path), "public_key": keys.key_to_dict(signer)})


def _rotate_root(args: argparse.Namespace) -> None:
    old_signers = [keys.load_signer(p) for p in args.root_key]
    new_signers = [keys.load_signer(p) for p in args.new_root_key] if args.new_root_key else None
    new_root = next_root(
        _read(args.root),
        old_signers,
        root_signers=new_signers,
        targets_keys=[keys.public_key(p) for p in args.targets_key] if args.targets_key else None,
        snapshot_key=keys.public_key(args.snapshot_key) if args.snapshot_key else None,
        timestamp_key=keys.public_key(args.timestamp_key) if args.timestamp_key else None,
        expires_days=args.expires_days,
    )
    args.out.write_bytes(new_root)
    _print({"written": str(args.out), **_summary(new_root)})


def _show(args: argparse.Namespace) -> None:
    _print(_summary(_read(args.root)))


def _summary(root_bytes: bytes) -> dict[str, Any]:
    root = parse_metadata(root_bytes, Root, "root").signed
    roles = {name: {"threshold": role.threshold, "keyids": role.keyids} for name, role in root.roles.items()}
    return {"version": root.version, "expires": root.expires.isoformat(), "roles": roles}


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror}") from e


def _print(data: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
