"""``keys init`` and ``publish``: sign a converted bundle into a TUF repository.

The release keys (TUF root and targets roles) live in ``$EDGEFLEET_HOME/keys/`` (PKCS#8 PEM
Ed25519, mode 0600) and never leave the workstation. A bundle is published as the targets
``<name>/<version>/manifest.json`` and one ``<name>/<version>/<variant_id>.tar.gz`` per variant
(``bundles.archive.pack_variant``), in a new targets version signed with the targets key.

- ``--repo DIR``: a TUF repository directory on this machine. On first use it is created with our
  root and targets keys; its online snapshot and timestamp keys are generated next to the release
  keys (a local repository has no server to hold them).
- ``--server URL --api-key KEY``: the fleet server's admin API. ``GET /api/v1/admin/tuf/state``
  gives the trusted root, the current targets and the online keys; when the server has no root
  yet, we sign root v1 (our root and targets keys, its online keys) and ``PUT`` it; then the
  publication made by ``bundles.tuf.publication.make_publication`` is ``POST``ed.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from bundles.archive import pack_variant, read_manifest
from bundles.canonical import sha256_file
from bundles.errors import AuthError, ConfigError, EdgeFleetError, KeyFileError, TransportError
from bundles.manifest import Manifest
from bundles.tuf import keys as tuf_keys
from bundles.tuf.publication import make_publication
from bundles.tuf.repository import LocalRepository, TufRepository
from bundles.tuf.root import make_root
from converter.home import Home

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


def bundle_files(bundle_dir: Path, manifest: Manifest, out_dir: Path) -> dict[str, Path]:
    """Target path -> local file for a bundle: its manifest and one archive per variant."""
    prefix = f"{manifest.name}/{manifest.version}"
    files = {f"{prefix}/manifest.json": bundle_dir / "manifest.json"}
    for variant in manifest.variants:
        files[f"{prefix}/{variant.id}.tar.gz"] = pack_variant(
            bundle_dir, manifest, variant.id, out_dir / f"{variant.id}.tar.gz"
        )
    return files


def publish_to_repo(home: Home, bundle_dir: Path, repo_dir: Path) -> list[str]:
    """Sign the bundle into the local TUF repository at ``repo_dir``; returns the new target paths."""
    local = _open_local(home, repo_dir)
    manifest = read_manifest(bundle_dir)
    with tempfile.TemporaryDirectory(prefix="edgefleet-publish-") as temp:
        files = bundle_files(bundle_dir, manifest, Path(temp))
        current = local.repository.current_targets()
        refuse_replacing(manifest, None if current is None else json.loads(current), files)
        return local.publish(files)


def refuse_replacing(manifest: Manifest, current_targets: dict[str, Any] | None, files: dict[str, Path]) -> None:
    """A published version is immutable: the same bytes may be published again, different ones may not."""
    listed = (current_targets or {}).get("signed", {}).get("targets", {})
    for path, local in files.items():
        published = listed.get(path, {}).get("hashes", {}).get("sha256")
        if published is not None and published != sha256_file(local):
            raise ConfigError(
                f"model {manifest.ref} is already published with different content ({path}); "
                "register a new version instead of replacing a published one"
            )


def _open_local(home: Home, repo_dir: Path) -> LocalRepository:
    signers = {role: release_signer(home, role) for role in RELEASE_ROLES}
    for role in LOCAL_ONLINE_ROLES:
        if not key_path(home, role).exists():
            tuf_keys.generate_key(key_path(home, role))
    if (repo_dir / "metadata" / "root.json").exists():
        return LocalRepository.open(repo_dir, home.keys_dir)
    repository = TufRepository(repo_dir)
    online = {role: tuf_keys.load_signer(key_path(home, role)) for role in LOCAL_ONLINE_ROLES}
    repository.initialize([signers["root"]], [signers["targets"]], online["snapshot"], online["timestamp"])
    return LocalRepository(repository, home.keys_dir)


def publish_to_server(home: Home, bundle_dir: Path, server_url: str, api_key: str) -> list[str]:
    """Publish through the fleet server's admin API; returns the target paths the server accepted."""
    import httpx

    targets_signer = release_signer(home, "targets")
    manifest = read_manifest(bundle_dir)
    headers = {"Authorization": f"Bearer {api_key}"}
    base = server_url.rstrip("/")
    with httpx.Client(base_url=base, headers=headers, timeout=_TIMEOUT_S) as client:
        state = _call(client, "GET", "/api/v1/admin/tuf/state")
        root_bytes = _ensure_root(client, home, state)
        current = None if state.get("targets") is None else _signed_bytes(client, state["targets"], "targets")
        with tempfile.TemporaryDirectory(prefix="edgefleet-publish-") as temp:
            files = bundle_files(bundle_dir, manifest, Path(temp))
            refuse_replacing(manifest, state.get("targets"), files)
            package = make_publication(current, root_bytes, files, targets_signer, Path(temp) / "publication.tar.gz")
            answer = _call(client, "POST", "/api/v1/admin/publications", content=package.read_bytes(),
                           headers={"Content-Type": "application/gzip"})  # fmt: skip
    return [str(t) for t in answer.get("targets", sorted(files))]


def _signed_bytes(client: Any, document: dict[str, Any], role: str) -> bytes:
    """The exact bytes of a signed metadata file the server serves (``/tuf/metadata/<v>.<role>.json``).

    Falls back to re-serialising the state's JSON object (signatures cover the canonical form of
    ``signed``, so that verifies too) when the repository is not served at the usual path.
    """
    version = document.get("signed", {}).get("version")
    response = client.get(f"/tuf/metadata/{version}.{role}.json")
    if response.status_code == 200:
        return bytes(response.content)
    return json.dumps(document).encode("utf-8")


def _ensure_root(client: Any, home: Home, state: dict[str, Any]) -> bytes:
    if state.get("root") is not None:
        return _signed_bytes(client, state["root"], "root")
    online = state.get("online_keys") or {}
    if "snapshot" not in online or "timestamp" not in online:
        raise ConfigError("the fleet server reported no online snapshot/timestamp keys; run 'edgefleet-server init'")
    root_bytes = make_root(
        [release_signer(home, "root")], [release_signer(home, "targets")],
        tuf_keys.key_from_dict(online["snapshot"]), tuf_keys.key_from_dict(online["timestamp"]),
    )  # fmt: skip
    _call(client, "PUT", "/api/v1/admin/tuf/root", content=root_bytes, headers={"Content-Type": "application/json"})
    return root_bytes


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
