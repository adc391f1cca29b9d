"""The device client against a real repository served over real HTTP on loopback, honest and hostile."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest

from bundles.errors import (
    AuthError,
    BadSignatureError,
    ExpiredMetadataError,
    MixAndMatchError,
    RollbackAttackError,
    ServerError,
    TargetMismatchError,
    TransportError,
    UnknownTargetError,
)
from bundles.manifest import Manifest
from bundles.tuf.client import TufClient
from bundles.tuf.common import Expiry
from bundles.tuf.repository import TufRepository
from bundles.tuf.testing import FileServer
from tests.bundles.tuf.conftest import MANIFEST, VARIANT, VARIANT_BYTES, Repo
from tests.bundles.tuf.forge import attacker_key, forge_targets, meta_file, read_md, sign_timestamp

MakeClient = Callable[..., TufClient]


def served_name(repo: Repo, target: str) -> str:
    """The hash-prefixed file name under which a target is served."""
    sha = repo.local.repository.target_info(target).hashes["sha256"]
    return f"{sha}.{target.rsplit('/', 1)[1]}"


def variant_bytes(repo: Repo) -> bytes:
    return (repo.local.repository.targets_dir / "digits" / "1" / served_name(repo, VARIANT)).read_bytes()


# --- the honest path -------------------------------------------------------------------------------
def test_download_returns_the_published_bytes_and_then_uses_the_verified_cache(
    repo: Repo, server: FileServer, make_client: MakeClient
) -> None:
    client = make_client()
    path = client.download(VARIANT)
    assert path.read_bytes() == variant_bytes(repo)
    assert client.target_info(MANIFEST).custom == {
        "edgefleet": {"kind": "manifest", "name": "digits", "version": 1, "variant": None}
    }
    requests_before = len(server.requests_for(served_name(repo, VARIANT)))
    assert make_client().download(VARIANT) == path
    assert len(server.requests_for(served_name(repo, VARIANT))) == requests_before == 1


def test_client_sees_a_new_publication_after_refresh(repo: Repo, make_client: MakeClient) -> None:
    client = make_client()
    client.refresh()
    repo.publish({"digits/2/manifest.json": b'{"version": 2}'})
    with pytest.raises(UnknownTargetError):
        client.target_info("digits/2/manifest.json")  # the old refresh does not know it yet
    client.refresh()
    assert client.download("digits/2/manifest.json").read_bytes() == b'{"version": 2}'


def test_unknown_target_is_refused(make_client: MakeClient) -> None:
    with pytest.raises(UnknownTargetError, match="not listed"):
        make_client().download("digits/9/manifest.json")


# --- freeze, rollback, mix-and-match ------------------------------------------------------------------
def test_expired_timestamp_is_refused(repo: Repo, make_client: MakeClient) -> None:
    stale = TufRepository(repo.path, expiry=Expiry(timestamp=timedelta(seconds=-60)))
    assert stale.refresh_timestamp(repo.local.signer("timestamp"), if_expires_within_s=10**9) == ["timestamp"]
    with pytest.raises(ExpiredMetadataError, match="timestamp.json is expired"):
        make_client().refresh()


def test_replayed_old_timestamp_is_a_rollback(repo: Repo, server: FileServer, make_client: MakeClient) -> None:
    old_timestamp = (repo.local.repository.metadata_dir / "timestamp.json").read_bytes()
    repo.publish({"digits/2/manifest.json": b"{}"})
    make_client().refresh()  # the device now trusts timestamp v2
    server.serve_bytes("/timestamp.json", old_timestamp)
    with pytest.raises(RollbackAttackError, match="timestamp version 1 must be >= 2"):
        make_client().refresh()


def test_timestamp_pointing_to_an_older_snapshot_is_a_rollback(repo: Repo, make_client: MakeClient) -> None:
    repo.publish({"digits/2/manifest.json": b"{}"})
    make_client().refresh()  # trusts snapshot v2
    old_snapshot = (repo.local.repository.metadata_dir / "1.snapshot.json").read_bytes()
    sign_timestamp(repo, meta_file(1, old_snapshot))  # a compromised server holds the timestamp key
    with pytest.raises(RollbackAttackError, match="snapshot version must be >= 2"):
        make_client().refresh()


def test_old_snapshot_served_with_a_new_timestamp_is_mix_and_match(
    repo: Repo, server: FileServer, make_client: MakeClient
) -> None:
    repo.publish({"digits/2/manifest.json": b"{}"})
    old_snapshot = (repo.local.repository.metadata_dir / "1.snapshot.json").read_bytes()
    server.serve_bytes("/2.snapshot.json", old_snapshot)
    with pytest.raises(MixAndMatchError, match="does not match"):
        make_client().refresh()


def test_old_targets_served_with_a_new_snapshot_is_mix_and_match(
    repo: Repo, server: FileServer, make_client: MakeClient
) -> None:
    repo.publish({"digits/2/manifest.json": b"{}"})
    old_targets = (repo.local.repository.metadata_dir / "1.targets.json").read_bytes()
    server.serve_bytes("/2.targets.json", old_targets)
    with pytest.raises(MixAndMatchError):
        make_client().refresh()


# --- signatures and hashes ---------------------------------------------------------------------------
def test_targets_signed_by_a_key_other_than_the_release_key_are_refused(repo: Repo, make_client: MakeClient) -> None:
    forge_targets(repo, {VARIANT: b"evil model"}, attacker_key())  # snapshot + timestamp validly signed
    with pytest.raises(BadSignatureError, match="targets was signed by 0/1 keys"):
        make_client().refresh()


def test_targets_signed_by_the_online_snapshot_key_are_refused(repo: Repo, make_client: MakeClient) -> None:
    forge_targets(repo, {VARIANT: b"evil model"}, repo.local.signer("snapshot"))
    with pytest.raises(BadSignatureError):
        make_client().download(VARIANT)


def test_timestamp_signed_by_an_unknown_key_is_refused(repo: Repo, make_client: MakeClient) -> None:
    snapshot_meta = read_md(repo, "timestamp.json").signed.snapshot_meta
    sign_timestamp(repo, snapshot_meta, signer=attacker_key())
    with pytest.raises(BadSignatureError, match="timestamp"):
        make_client().refresh()


@pytest.mark.parametrize("tamper", ["flip_one_byte", "append_bytes", "truncate"])
def test_target_whose_bytes_do_not_match_the_signed_hash_is_refused(
    repo: Repo, server: FileServer, make_client: MakeClient, tamper: str
) -> None:
    good = variant_bytes(repo)
    bad = {
        "flip_one_byte": good[:1000] + bytes([good[1000] ^ 1]) + good[1001:],
        "append_bytes": good + b"\0" * 10,
        "truncate": good[:-10],
    }[tamper]
    server.serve_bytes(served_name(repo, VARIANT), bad)
    client = make_client()
    with pytest.raises(TargetMismatchError):
        client.download(VARIANT)
    assert client.cached_path(VARIANT) is None


# --- root rotation -----------------------------------------------------------------------------------
def test_client_follows_a_root_rotation_of_the_root_and_timestamp_keys(
    repo: Repo, make_client: MakeClient, tmp_path: Path
) -> None:
    from bundles.tuf.keys import generate_key
    from bundles.tuf.root import next_root

    client = make_client()
    client.refresh()
    new_root_key = generate_key(tmp_path / "new-root.key")
    new_ts = generate_key(tmp_path / "new-timestamp.key")
    v2 = next_root(repo.root(), [repo.local.signer("root")], root_signers=[new_root_key], timestamp_key=new_ts)
    repo.local.repository.rotate_root(v2, repo.local.signer("snapshot"), new_ts)
    later = make_client()  # same device state, bootstrapped with root v1
    assert later.download(VARIANT).read_bytes() == variant_bytes(repo)
    assert later.trusted_root_version() == 2


def test_client_refuses_a_root_rotation_not_signed_by_the_old_root_keys(
    repo: Repo, server: FileServer, make_client: MakeClient
) -> None:
    from bundles.tuf.root import make_root

    evil = attacker_key()
    forged = make_root([evil], [evil], evil, evil, version=2)  # self-signed by the attacker only
    server.serve_bytes("/2.root.json", forged)
    with pytest.raises(BadSignatureError, match="root"):
        make_client().refresh()


def test_targets_signed_by_a_rotated_out_targets_key_are_refused(
    repo: Repo, make_client: MakeClient, tmp_path: Path
) -> None:
    """A stolen release key stops working for devices once the root rotates it out."""
    from bundles.tuf.keys import generate_key
    from bundles.tuf.root import next_root

    make_client().refresh()
    stolen, fresh = repo.local.signer("targets"), generate_key(tmp_path / "targets.new")
    v2 = next_root(repo.root(), [repo.local.signer("root")], targets_keys=[fresh])
    repo.local.repository.rotate_root(v2, repo.local.signer("snapshot"), repo.local.signer("timestamp"))
    forge_targets(repo, {"evil/1/manifest.json": b"{}"}, stolen)
    with pytest.raises(BadSignatureError, match="targets"):
        make_client().refresh()
    forge_targets(repo, {"digits/2/manifest.json": b"{}"}, fresh)
    fixed = make_client()
    fixed.refresh()
    assert fixed.trusted_root_version() == 2


# --- the network -----------------------------------------------------------------------------------
def test_download_cut_mid_way_resumes_with_range_without_refetching_the_first_part(
    repo: Repo, server: FileServer, make_client: MakeClient
) -> None:
    name = served_name(repo, VARIANT)
    server.cut_after(name, 100_000)
    client = make_client()
    assert client.download(VARIANT).read_bytes() == variant_bytes(repo)
    ranges = [r.range for r in server.requests_for(name)]
    assert ranges == [None, "bytes=100000-"]
    assert server.bytes_served(name) == VARIANT_BYTES
    assert client.fetcher.resumes == 1


def test_download_interrupted_by_a_restart_continues_from_the_kept_part(
    repo: Repo, server: FileServer, make_client: MakeClient, tmp_path: Path
) -> None:
    name = served_name(repo, VARIANT)
    server.cut_after(name, 120_000)
    with pytest.raises(TransportError):
        make_client(max_resumes=0).download(VARIANT)
    parts = list((tmp_path / "device" / "targets" / ".partial").iterdir())
    assert [p.stat().st_size for p in parts] == [120_000]
    assert make_client().download(VARIANT).read_bytes() == variant_bytes(repo)
    assert [r.range for r in server.requests_for(name)] == [None, "bytes=120000-"]
    assert server.bytes_served(name) == VARIANT_BYTES
    assert not any(p.exists() for p in parts)


def test_a_tampered_kept_part_is_caught_by_the_hash_and_discarded(
    repo: Repo, server: FileServer, make_client: MakeClient, tmp_path: Path
) -> None:
    name = served_name(repo, VARIANT)
    server.cut_after(name, 50_000)
    with pytest.raises(TransportError):
        make_client(max_resumes=0).download(VARIANT)
    (part,) = (tmp_path / "device" / "targets" / ".partial").iterdir()
    part.write_bytes(os.urandom(50_000))
    with pytest.raises(TargetMismatchError):
        make_client().download(VARIANT)
    assert not part.exists()
    assert make_client().download(VARIANT).read_bytes() == variant_bytes(repo)


def test_bearer_token_is_sent_and_a_refusal_is_an_auth_error(repo: Repo, tmp_path: Path) -> None:
    with FileServer.for_repository(repo.path, required_headers={"Authorization": "Bearer s3cret"}) as server:
        urls = (server.url("/tuf/metadata/"), server.url("/tuf/targets/"))
        with TufClient(tmp_path / "a" / "m", tmp_path / "a" / "t", *urls, repo.root(), bearer_token="s3cret") as ok:
            assert hashlib.sha256(ok.download(VARIANT).read_bytes()).hexdigest() in served_name(repo, VARIANT)
        with TufClient(tmp_path / "b" / "m", tmp_path / "b" / "t", *urls, repo.root()) as anonymous:
            with pytest.raises(AuthError, match="HTTP 401"):
                anonymous.refresh()


def test_server_errors_and_unreachable_servers_are_transport_errors(
    repo: Repo, server: FileServer, make_client: MakeClient, tmp_path: Path
) -> None:
    server.fail_with("/timestamp.json", 503)
    with pytest.raises(ServerError, match="HTTP 503"):
        make_client().refresh()
    dead = FileServer.for_repository(repo.path).start()
    url = dead.url("/tuf/metadata/")
    dead.stop()
    with TufClient(tmp_path / "m", tmp_path / "t", url, url, repo.root(), timeout_s=2) as client:
        with pytest.raises(TransportError):
            client.refresh()


def test_a_real_bundle_manifest_travels_through_the_repository_and_parses(
    repo: Repo, make_client: MakeClient, pristine_bundle: tuple[Manifest, Path]
) -> None:
    manifest, bundle_dir = pristine_bundle
    target = f"{manifest.name}/{manifest.version}/manifest.json"
    repo.local.publish({target: bundle_dir / "manifest.json"})
    fetched = make_client().download(target)
    assert Manifest.from_bytes(fetched.read_bytes()) == manifest


def test_a_trickling_server_is_cut_off_as_a_slow_retrieval(
    repo: Repo, server: FileServer, make_client: MakeClient
) -> None:
    name = served_name(repo, VARIANT)
    server.drip(name, 200, 0.02)  # ~10 kB/s, far below the floor below
    client = make_client(stall_window_s=0.2, min_bytes_per_window=50_000)
    with pytest.raises(TransportError, match="too slow"):
        client.download(VARIANT)


def test_a_cut_metadata_download_resumes_in_place_but_is_never_kept_across_restarts(
    server: FileServer, make_client: MakeClient, tmp_path: Path
) -> None:
    server.cut_after("/timestamp.json", 40)
    with pytest.raises(TransportError):
        make_client(max_resumes=0).refresh()
    partial_dir = tmp_path / "device" / "targets" / ".partial"
    assert not partial_dir.exists() or not any(partial_dir.iterdir())
    server.cut_after("/timestamp.json", 40)
    client = make_client()
    client.refresh()
    assert [r.range for r in server.requests_for("/timestamp.json")][-2:] == [None, "bytes=40-"]


def test_expired_snapshot_is_refused(repo: Repo, make_client: MakeClient) -> None:
    stale = TufRepository(repo.path, expiry=Expiry(snapshot=timedelta(seconds=-60)))
    resigned = stale.refresh_timestamp(
        repo.local.signer("timestamp"),
        snapshot_signer=repo.local.signer("snapshot"),
        snapshot_if_expires_within_s=10**9,
    )
    assert resigned == ["snapshot", "timestamp"]
    with pytest.raises(ExpiredMetadataError, match="snapshot.json is expired"):
        make_client().refresh()


def test_expired_targets_signed_by_the_release_key_are_refused(repo: Repo, make_client: MakeClient) -> None:
    forge_targets(repo, {VARIANT: b"old release"}, repo.local.signer("targets"), expires_days=-1)
    with pytest.raises(ExpiredMetadataError, match="targets is expired"):
        make_client().refresh()
