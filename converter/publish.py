"""``keys init``, ``publish``, ``revoke``, ``floor`` and the team ledger: what the release key signs, and why.

The release keys (TUF root and targets roles) live in ``$EDGEFLEET_HOME/keys/`` (PKCS#8 PEM
Ed25519, mode 0600) and never leave the workstation. A bundle is published as the targets
``<name>/<version>/manifest.json`` and one ``<name>/<version>/<variant_id>.tar.gz`` per variant
(``bundles.archive.pack_variant``), in a new targets version signed with the targets key.

Every command that signs targets runs :func:`release`:

1. the destination's root is checked against the root this workstation pinned
   (:mod:`converter.trust`; the first publication pins it);
2. its current targets are reconciled with the workstation's ledger: the next version is built from
   the ledger, and a server entry the release key did not sign is refused, never re-signed;
3. the :class:`Plan` (what the new version adds, removes and changes, and what was signed
   elsewhere since) goes to ``confirm``: the CLI shows it and asks, or needs ``--yes``;
4. only then is the targets version signed, uploaded, and recorded in the ledger.

Destinations:

- ``--repo DIR`` (:class:`RepoDestination`): a TUF repository directory on this machine. On first
  use it is created with our root and targets keys; its online snapshot and timestamp keys are
  generated next to the release keys (a local repository has no server to hold them).
- ``--server URL --api-key KEY`` (:class:`ServerDestination`): the fleet server's admin API.
  ``GET /api/v1/admin/tuf/state`` names the current root and targets (their exact bytes come from
  ``/tuf/metadata/``) and the online keys; when the server has no root yet, we sign root v1 (our
  root and targets keys, its online keys) and ``PUT`` it; a publication is ``POST``ed.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from tuf.api.metadata import Root, TargetFile, Targets

from bundles.archive import pack_variant, read_manifest
from bundles.errors import (
    AuthError,
    ConfigError,
    EdgeFleetError,
    KeyFileError,
    TransportError,
    TrustError,
    UntrustedRecordError,
)
from bundles.manifest import Manifest
from bundles.tuf import keys as tuf_keys
from bundles.tuf.common import parse_metadata, verify_root_chain
from bundles.tuf.publication import sign_targets, target_file, write_publication
from bundles.tuf.repository import KEY_FILES, TufRepository
from bundles.tuf.root import make_root, role_keys
from converter.home import Home
from converter.trust import (
    Reconciled,
    ServerChange,
    TrustStore,
    export_ledger,
    read_export,
    reconcile,
    repo_destination,
    server_destination,
    signed_sha256,
    stamp_floors,
    verify_first_root,
    verify_root_from_pin,
)

RELEASE_ROLES = ("root", "targets")
LOCAL_ONLINE_ROLES = ("snapshot", "timestamp")
_TIMEOUT_S = 60.0


def key_path(home: Home, role: str) -> Path:
    return home.keys_dir / f"{role}.key"


def init_keys(home: Home, overwrite: bool = False) -> dict[str, str]:
    """Generate the release keys; refuses to replace existing ones unless ``overwrite``. Returns keyids."""
    home.keys_dir.mkdir(parents=True, exist_ok=True)
    home.keys_dir.chmod(0o700)
    return {
        role: tuf_keys.generate_key(key_path(home, role), overwrite=overwrite).public_key.keyid
        for role in RELEASE_ROLES
    }


def release_signer(home: Home, role: str) -> Any:
    path = key_path(home, role)
    if not path.exists():
        raise KeyFileError(f"no {role} key at {path}: run 'edgefleet-convert keys init' first")
    return tuf_keys.load_signer(path)


def own_public_key(home: Home, role: str) -> Any:
    """This workstation's public key of ``role`` (from ``<key>.pub.json``, else from the private key)."""
    public = tuf_keys.public_key_path(key_path(home, role))
    if public.is_file():
        return tuf_keys.public_key(public)
    return release_signer(home, role).public_key


def bundle_files(bundle_dir: Path, manifest: Manifest, out_dir: Path) -> dict[str, Path]:
    """Target path -> local file for a bundle: its manifest and one archive per variant."""
    prefix = f"{manifest.name}/{manifest.version}"
    files = {f"{prefix}/manifest.json": bundle_dir / "manifest.json"}
    for variant in manifest.variants:
        files[f"{prefix}/{variant.id}.tar.gz"] = pack_variant(
            bundle_dir, manifest, variant.id, out_dir / f"{variant.id}.tar.gz"
        )
    return files


# --- what to sign ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Change:
    """What the engineer asks for: files to add, bundles to revoke (target path prefixes), floors to
    set (``None`` removes a model's floor)."""

    what: str
    files: Mapping[str, Path] = field(default_factory=dict)
    revoke: Sequence[str] = ()
    floors: Mapping[str, int | None] = field(default_factory=dict)


@dataclass
class Plan:
    """The targets version about to be signed, as a diff against the current one (shown before signing)."""

    destination: str
    version: int
    added: list[str]
    removed: list[str]
    changed: list[str]
    floors: dict[str, int]
    from_server: ServerChange | None
    listed: dict[str, TargetFile] = field(repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {"destination": self.destination, "targets_version": self.version, "added": self.added,
                "removed": self.removed, "changed": self.changed, "floors": self.floors,
                "signed_elsewhere": None if self.from_server is None else self.from_server.to_dict()}  # fmt: skip


@dataclass
class Released:
    """The outcome: the plan, whether it was signed, and the target paths the destination took in."""

    plan: Plan
    signed: bool
    accepted: list[str] = field(default_factory=list)


def make_plan(reconciled: Reconciled, change: Change) -> Plan:
    """The next targets version: the ledger's targets, plus and minus the change, with the floors stamped."""
    ledger = reconciled.ledger
    current = ledger.target_files()
    listed = dict(current)
    for prefix in change.revoke:
        revoked = [path for path in listed if path.startswith(prefix)]
        if not revoked:
            raise ConfigError(f"{change.what}: targets v{ledger.targets_version} of {ledger.destination} list nothing "
                              f"under {prefix}")  # fmt: skip
        for path in revoked:
            del listed[path]
    for path, local in change.files.items():
        listed[path] = _new_or_same(change.what, current.get(path), target_file(path, local))
    floors = _floors_after(ledger.floors, change, listed)
    listed = stamp_floors(listed, floors)
    changed = sorted(p for p in set(listed) & set(current) if listed[p].to_dict() != current[p].to_dict())
    return Plan(ledger.destination, ledger.targets_version + 1, sorted(set(listed) - set(current)),
                sorted(set(current) - set(listed)), changed, floors, reconciled.from_server, listed)  # fmt: skip


def _floors_after(floors: Mapping[str, int], change: Change, listed: Mapping[str, TargetFile]) -> dict[str, int]:
    """The floors once ``change`` applies; a floor must be a version that stays published."""
    after = dict(floors)
    for name, version in change.floors.items():
        if version is None:
            after.pop(name, None)
            continue
        if f"{name}/{version}/manifest.json" not in listed:
            raise ConfigError(f"{name}@{version} is not published there: a floor must be a published version")
        after[name] = version
    return after


def _new_or_same(what: str, published: TargetFile | None, new: TargetFile) -> TargetFile:
    """A published version is immutable: the same bytes may be published again, different ones may not."""
    if published is None:
        return new
    if (published.length, published.hashes) != (new.length, new.hashes):
        raise ConfigError(
            f"model {what} is already published with different content ({new.path}); "
            "register a new version instead of replacing a published one"
        )
    return published


# --- destinations ----------------------------------------------------------------------------------


class Destination(Protocol):
    """Where targets are published: a fleet server or a local repository directory."""

    name: str

    def current_root(self) -> bytes | None:
        """The exact bytes of the current root (None before the first)."""

    def root_version(self, version: int) -> bytes:
        """The exact bytes of root ``version``."""

    def install_first_root(self, home: Home) -> bytes:
        """Sign root v1 with this workstation's keys (and the destination's online keys) and install it."""

    def current_targets(self) -> bytes | None:
        """The exact bytes of the current targets (None before the first publication)."""

    def upload(self, targets_bytes: bytes, files: Mapping[str, Path]) -> list[str]:
        """Hand signed targets and their new files to the destination; returns the paths it took in."""


class ServerDestination:
    """A fleet server's admin API (``--server URL --api-key KEY``)."""

    def __init__(self, url: str, api_key: str) -> None:
        import httpx

        self.name = server_destination(url)
        self.client = httpx.Client(base_url=self.name, headers={"Authorization": f"Bearer {api_key}"},
                                   timeout=_TIMEOUT_S)  # fmt: skip
        self._state: dict[str, Any] | None = None

    def close(self) -> None:
        self.client.close()

    def state(self) -> dict[str, Any]:
        if self._state is None:
            self._state = _call(self.client, "GET", "/api/v1/admin/tuf/state")
        return self._state

    def current_root(self) -> bytes | None:
        return self._metadata("root")

    def root_version(self, version: int) -> bytes:
        return self._fetch(f"/tuf/metadata/{version}.root.json", f"root v{version}")

    def install_first_root(self, home: Home) -> bytes:
        online = self.state().get("online_keys") or {}
        if "snapshot" not in online or "timestamp" not in online:
            raise ConfigError(
                "the fleet server reported no online snapshot/timestamp keys; run 'edgefleet-server init'"
            )
        root_bytes = make_root(
            [release_signer(home, "root")], [own_public_key(home, "targets")],
            tuf_keys.key_from_dict(online["snapshot"]), tuf_keys.key_from_dict(online["timestamp"]),
        )  # fmt: skip
        _call(self.client, "PUT", "/api/v1/admin/tuf/root", content=root_bytes,
              headers={"Content-Type": "application/json"})  # fmt: skip
        return root_bytes

    def current_targets(self) -> bytes | None:
        return self._metadata("targets")

    def upload(self, targets_bytes: bytes, files: Mapping[str, Path]) -> list[str]:
        with tempfile.TemporaryDirectory(prefix="edgefleet-publish-") as temp:
            package = write_publication(targets_bytes, files, Path(temp) / "publication.tar.gz")
            answer = _call(self.client, "POST", "/api/v1/admin/publications", content=package.read_bytes(),
                           headers={"Content-Type": "application/gzip"})  # fmt: skip
        return [str(t) for t in answer.get("targets", sorted(files))]

    def _metadata(self, role: str) -> bytes | None:
        """The exact bytes of the current ``role`` metadata, which must match what the state names."""
        document = self.state().get(role)
        if document is None:
            return None
        version = document.get("signed", {}).get("version") if isinstance(document, dict) else None
        if not isinstance(version, int):
            raise UntrustedRecordError(f"{self.name} reports a current {role} without a version")
        raw = self._fetch(f"/tuf/metadata/{version}.{role}.json", f"{role} v{version}")
        if role == "root" and _root_sha(raw) != _root_sha(json.dumps(document).encode()):
            raise UntrustedRecordError(f"{self.name} names one root v{version} and serves another")
        return raw

    def _fetch(self, path: str, what: str) -> bytes:
        import httpx

        try:
            response = self.client.get(path)
        except httpx.HTTPError as e:
            raise TransportError(f"fleet server {self.name} is unreachable ({type(e).__name__}: {e})") from e
        if response.status_code != 200:
            raise UntrustedRecordError(f"{self.name} does not serve {what} ({response.status_code} for {path})")
        return bytes(response.content)


REPORT_PLOTS = {"report": "plot.png", "agreement": "agreement.png"}
"""The conversion report's plots a fleet server keeps for its dashboard: kind -> file in the report directory."""


def upload_plots(destination: ServerDestination, name: str, version: int, report_dir: Path) -> list[str]:
    """Upload the report plots found in ``report_dir`` beside the published ``name@version``; their kinds.

    Display only: not signed (the plots carry timings, which the reproducible bundle leaves out), never
    sent to a device; a later upload replaces them.
    """
    uploaded = []
    for kind, filename in REPORT_PLOTS.items():
        path = report_dir / filename
        if path.is_file():
            _call(destination.client, "PUT", f"/api/v1/admin/bundles/{name}/{version}/plots/{kind}",
                  content=path.read_bytes(), headers={"Content-Type": "image/png"})  # fmt: skip
            uploaded.append(kind)
    return uploaded


def _root_sha(data: bytes) -> str:
    return signed_sha256(parse_metadata(data, Root, "root"))


class RepoDestination:
    """A TUF repository directory on this machine (``--repo DIR``), with local online keys."""

    def __init__(self, home: Home, repo_dir: Path) -> None:
        self.home, self.repo_dir = home, repo_dir.resolve()
        self.name = repo_destination(self.repo_dir)
        self.repository = TufRepository(self.repo_dir)

    def close(self) -> None:
        return None

    def current_root(self) -> bytes | None:
        return self.repository.trusted_root()

    def root_version(self, version: int) -> bytes:
        path = self.repo_dir / "metadata" / f"{version}.root.json"
        if not path.is_file():
            raise UntrustedRecordError(f"{self.name} has no root v{version}")
        return path.read_bytes()

    def install_first_root(self, home: Home) -> bytes:
        signers = {role: release_signer(home, role) for role in RELEASE_ROLES}
        online = [self._online_signer(role) for role in LOCAL_ONLINE_ROLES]
        self.repository.initialize([signers["root"]], [signers["targets"]], online[0], online[1])
        root = self.repository.trusted_root()
        assert root is not None
        return root

    def current_targets(self) -> bytes | None:
        return self.repository.current_targets()

    def upload(self, targets_bytes: bytes, files: Mapping[str, Path]) -> list[str]:
        snapshot, timestamp = (self._online_signer(role) for role in LOCAL_ONLINE_ROLES)
        return self.repository.accept_targets(targets_bytes, dict(files), snapshot, timestamp)

    def _online_signer(self, role: str) -> Any:
        path = self.home.keys_dir / KEY_FILES[role]
        return tuf_keys.load_signer(path) if path.exists() else tuf_keys.generate_key(path)


# --- the release -----------------------------------------------------------------------------------


def trusted_root(home: Home, store: TrustStore, destination: Destination) -> bytes:
    """The destination's current root, verified from the pinned one (pinning the first if need be)."""
    current = destination.current_root()
    pinned = store.pinned_root()
    if current is None:
        if pinned is not None:
            raise UntrustedRecordError(
                f"{destination.name} has no TUF root, but this workstation pinned one: a wiped or replaced "
                f"server; nothing was signed (if it really was reinstalled, move {store.dir} away)"
            )
        pinned = destination.install_first_root(home)
        current = pinned
    elif pinned is None:
        first = current if parse_metadata(current, Root, "root").signed.version == 1 else destination.root_version(1)
        verify_first_root(first, own_public_key(home, "root"), destination.name)
        pinned = first
    chain = verify_root_from_pin(pinned, current, destination.root_version, destination.name)
    for root in [pinned, *chain]:
        store.keep_root(root)
    store.pin_root(chain[-1] if chain else pinned)
    return chain[-1] if chain else pinned


def release(home: Home, destination: Destination, change: Change, confirm: Callable[[Plan], bool]) -> Released:
    """Check the destination against this workstation's record, show the plan, sign it if confirmed."""
    signer = release_signer(home, "targets")
    store = TrustStore(home, destination.name)
    root = trusted_root(home, store, destination)
    reconciled = reconcile(store.ledger(), destination.current_targets(), root, store.pending())
    plan = make_plan(reconciled, change)
    if not confirm(plan):
        return Released(plan, signed=False)
    targets_bytes = sign_targets(root, plan.version, plan.listed, signer)
    store.set_pending(targets_bytes)
    accepted = destination.upload(targets_bytes, change.files)
    ledger = reconciled.ledger
    ledger.floors = plan.floors
    md = parse_metadata(targets_bytes, Targets, "signed targets")
    ledger.record(plan.version, signed_sha256(md), plan.listed, f"signed here: {change.what}")
    store.save_ledger(ledger)
    store.set_pending(None)
    return Released(plan, signed=True, accepted=accepted)


def publish_bundle(home: Home, destination: Destination, bundle_dir: Path, confirm: Callable[[Plan], bool]) -> Released:
    """Publish a converted bundle (its manifest and one archive per variant)."""
    manifest = read_manifest(bundle_dir)
    with tempfile.TemporaryDirectory(prefix="edgefleet-publish-") as temp:
        files = bundle_files(bundle_dir, manifest, Path(temp))
        return release(home, destination, Change(manifest.ref, files=files), confirm)


def revoke(home: Home, destination: Destination, name: str, version: int, confirm: Callable[[Plan], bool]) -> Released:
    """Drop every target of ``name@version`` in a new signed targets version: no device can fetch it again."""
    return release(home, destination, Change(f"revoke {name}@{version}", revoke=[f"{name}/{version}/"]), confirm)


def set_floor(
    home: Home, destination: Destination, name: str, version: int | None, confirm: Callable[[Plan], bool]
) -> Released:
    """Sign a floor for ``name`` (devices refuse versions below it), or remove it (``version=None``)."""
    what = f"floor {name}@{version}" if version is not None else f"no floor for {name}"
    return release(home, destination, Change(what, floors={name: version}), confirm)


# --- the team ledger -------------------------------------------------------------------------------


def export_team_ledger(home: Home, destination: str, out_path: Path) -> Path:
    """Write this workstation's ledger and root chain for ``destination``, signed by the targets key."""
    store = TrustStore(home, destination)
    pinned = store.pinned_root()
    if pinned is None:
        raise ConfigError(f"nothing is pinned for {destination} yet: publish there first")
    version = parse_metadata(pinned, Root, "pinned root").signed.version
    roots = [store.root_version(v) for v in range(1, version + 1)]
    out_path.write_bytes(export_ledger(store, release_signer(home, "targets"), roots))
    return out_path


def import_team_ledger(home: Home, data: bytes) -> tuple[str, int]:
    """Adopt a teammate's ledger export; returns (destination, targets version).

    The export must be signed by a targets key of the root pinned here (or, with nothing pinned yet,
    by this workstation's own targets key, which the exported roots must list); its roots must chain
    from the pinned one; and it must not be older than this workstation's ledger.
    """
    destination = _export_destination(data)
    store = TrustStore(home, destination)
    pinned = store.pinned_root()
    own_targets = own_public_key(home, "targets")
    trusted = [own_targets] if pinned is None else role_keys(pinned, "targets")
    imported = read_export(data, trusted)
    if imported.ledger.destination != destination:
        raise UntrustedRecordError("the ledger export names two destinations")
    newest = _verified_export_roots(imported.roots, pinned, destination)
    if pinned is None and own_targets.keyid not in [k.keyid for k in role_keys(newest, "targets")]:
        raise UntrustedRecordError(f"the exported root of {destination} does not list this workstation's targets key")
    local = store.ledger()
    if imported.ledger.targets_version < local.targets_version:
        raise ConfigError(f"the export holds targets v{imported.ledger.targets_version}, older than this workstation's "
                          f"v{local.targets_version}: nothing imported")  # fmt: skip
    for root in imported.roots:
        store.keep_root(root)
    store.pin_root(newest)
    ledger = imported.ledger
    ledger.history.append({"version": ledger.targets_version, "how": "imported from a team export"})
    store.save_ledger(ledger)
    return destination, ledger.targets_version


def _export_destination(data: bytes) -> str:
    try:
        return str(json.loads(data)["signed"]["ledger"]["destination"])
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"not an edgefleet ledger export ({e})") from e


def _verified_export_roots(roots: list[bytes], pinned: bytes | None, destination: str) -> bytes:
    """The newest exported root, walked from the pinned one (or from the exported v1)."""
    if not roots:
        raise UntrustedRecordError("the ledger export holds no root")
    by_version = {parse_metadata(r, Root, "exported root").signed.version: r for r in roots}

    def fetch(version: int) -> bytes:
        if version not in by_version:
            raise UntrustedRecordError(f"the ledger export lacks root v{version} of {destination}")
        return by_version[version]

    start = pinned if pinned is not None else fetch(1)
    if pinned is None:
        try:
            verify_root_chain(None, parse_metadata(start, Root, "exported root v1"), "exported root v1")
        except TrustError as e:
            raise UntrustedRecordError(f"the exported root v1 of {destination} does not verify ({e})") from e
    chain = verify_root_from_pin(start, by_version[max(by_version)], fetch, destination)
    return chain[-1] if chain else start


# --- talking to the server -------------------------------------------------------------------------


def _call(client: Any, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
    import httpx

    try:
        response = client.request(method, path, **kwargs)
    except httpx.HTTPError as e:
        raise TransportError(f"fleet server {client.base_url} is unreachable ({type(e).__name__}: {e})") from e
    if response.status_code in (401, 403):
        raise AuthError(f"fleet server refused the API key ({response.status_code}: {_detail(response)})")
    if response.status_code >= 400:
        raise _http_error(response, method, path)
    try:
        body: dict[str, Any] = response.json()
    except ValueError:
        body = {}
    return body


def _http_error(response: Any, method: str, path: str) -> EdgeFleetError:
    message = f"fleet server answered {response.status_code} to {method} {path}: {_detail(response)}"
    if response.status_code >= 500 or response.status_code == 429:
        return TransportError(message)
    return ConfigError(message)


def _detail(response: Any) -> str:
    try:
        return str(response.json().get("detail", response.text))[:300]
    except ValueError:
        return str(response.text)[:300]
