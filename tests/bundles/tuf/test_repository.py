"""The server-side repository: publications are verified before anything is stored, online roles are re-signed."""

from __future__ import annotations

import io
import os
import tarfile
import threading
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest
from securesystemslib.signer import CryptoSigner, Signer
from tuf.api.metadata import Metadata

from bundles.errors import (
    ArchiveError,
    BadSignatureError,
    ConfigError,
    ExpiredMetadataError,
    TargetMismatchError,
    TargetRewriteError,
    UnknownTargetError,
    VersionConflictError,
)
from bundles.tuf.common import Expiry, utc_now
from bundles.tuf.keys import generate_key
from bundles.tuf.publication import PublicationLimits, build_targets, make_publication
from bundles.tuf.repository import LocalRepository, TufRepository
from bundles.tuf.root import make_root, next_root

MANIFEST = "digits/3/manifest.json"
VARIANT = "digits/3/onnx-int8.tar.gz"


@dataclass
class Setup:
    """A workstation (root + release keys) and a fleet server (online keys + repository)."""

    tmp: Path
    root_key: Signer
    release_key: Signer
    snapshot_key: Signer
    timestamp_key: Signer
    repo: TufRepository

    def files(self, **contents: bytes) -> dict[str, Path]:
        out = {}
        for target, data in contents.items():
            path = self.tmp / "work" / target.replace("/", "_")
            path.parent.mkdir(exist_ok=True)
            path.write_bytes(data)
            out[target.replace("__", "/")] = path
        return out

    def publication(self, files: dict[str, Path], signer: Signer | None = None, **kwargs: object) -> Path:
        root = self.repo.trusted_root()
        assert root is not None
        out = self.tmp / f"pub-{os.urandom(4).hex()}.tar.gz"
        return make_publication(self.repo.current_targets(), root, files, signer or self.release_key, out, **kwargs)  # type: ignore[arg-type]

    def accept(self, publication: Path, **kwargs: object) -> list[str]:
        return self.repo.accept_publication(publication, self.snapshot_key, self.timestamp_key, **kwargs)  # type: ignore[arg-type]

    def state(self) -> dict[str, bytes]:
        return {p.name: p.read_bytes() for p in sorted(self.repo.root_dir.rglob("*")) if p.is_file()}


@pytest.fixture()
def setup(tmp_path: Path) -> Setup:
    keys = tmp_path / "keys"
    root_key, release_key = generate_key(keys / "root.key"), generate_key(keys / "targets.key")
    snapshot_key, timestamp_key = generate_key(keys / "snapshot.key"), generate_key(keys / "timestamp.key")
    repo = TufRepository(tmp_path / "repo")
    repo.rotate_root(make_root([root_key], [release_key], snapshot_key, timestamp_key))
    return Setup(tmp_path, root_key, release_key, snapshot_key, timestamp_key, repo)


def bundle_files(setup: Setup) -> dict[str, Path]:
    return setup.files(**{"digits__3__manifest.json": b'{"v": 3}', "digits__3__onnx-int8.tar.gz": os.urandom(5000)})


def rewrite_tar(publication: Path, edit: dict[str, bytes | None], extra: list[tarfile.TarInfo] = ()) -> Path:  # type: ignore[assignment]
    """Copy a publication, replacing (or dropping, with None) members and appending raw members."""
    out = publication.with_name("edited-" + publication.name)
    with tarfile.open(publication) as src, tarfile.open(out, "w:gz") as dst:
        for member in src.getmembers():
            data = src.extractfile(member).read()  # type: ignore[union-attr]
            if member.name in edit:
                if edit[member.name] is None:
                    continue
                data = edit[member.name]  # type: ignore[assignment]
                member.size = len(data)
            dst.addfile(member, io.BytesIO(data))
        for info in extra:
            dst.addfile(info, io.BytesIO(b"x" * info.size) if info.isreg() else None)
    return out


# --- accepting publications ---------------------------------------------------------------------------
def test_a_release_signed_publication_becomes_current_with_hash_prefixed_files(setup: Setup) -> None:
    files = bundle_files(setup)
    assert setup.accept(setup.publication(files)) == [MANIFEST, VARIANT]
    assert setup.repo.target_paths() == [MANIFEST, VARIANT]
    assert setup.repo.current_targets_version() == 1
    sha = setup.repo.target_info(VARIANT).hashes["sha256"]
    stored = setup.repo.target_file(f"digits/3/{sha}.onnx-int8.tar.gz")
    assert stored.read_bytes() == files[VARIANT].read_bytes()
    assert setup.repo.target_custom(VARIANT) == {
        "kind": "variant",
        "name": "digits",
        "version": 3,
        "variant": "onnx-int8",
    }
    names = sorted(p.name for p in setup.repo.metadata_dir.iterdir())
    assert names == ["1.root.json", "1.snapshot.json", "1.targets.json", "root.json", "timestamp.json"]


def test_publication_signed_by_a_non_release_key_is_refused_and_nothing_is_written(setup: Setup) -> None:
    intruder = CryptoSigner.generate_ed25519()
    own_root = make_root([intruder], [intruder], intruder, intruder)  # a root that trusts the intruder
    before = setup.state()
    forged = make_publication(None, own_root, bundle_files(setup), intruder, setup.tmp / "forged.tar.gz")
    with pytest.raises(BadSignatureError, match="not signed by enough targets keys of root v1"):
        setup.accept(forged)
    assert setup.state() == before


def test_workstation_refuses_to_sign_with_a_key_the_root_does_not_list(setup: Setup) -> None:
    with pytest.raises(ConfigError, match="is not a targets key of root v1"):
        setup.publication(bundle_files(setup), signer=setup.snapshot_key)


def test_publication_built_on_a_stale_targets_version_is_a_version_conflict(setup: Setup) -> None:
    first = setup.publication(bundle_files(setup))
    competing = setup.publication(setup.files(**{"other__1__manifest.json": b"{}"}))  # also version 1
    setup.accept(first)
    with pytest.raises(VersionConflictError, match="version 1, expected 2"):
        setup.accept(competing)
    with pytest.raises(VersionConflictError):
        setup.accept(first)  # a replay


def test_concurrent_publications_of_the_same_version_let_exactly_one_win(setup: Setup) -> None:
    pubs = [setup.publication(setup.files(**{f"m{i}__1__manifest.json": b"{}"})) for i in range(4)]
    outcomes: list[str] = []

    def accept(p: Path) -> None:
        try:
            setup.accept(p)
            outcomes.append("ok")
        except VersionConflictError:
            outcomes.append("conflict")

    threads = [threading.Thread(target=accept, args=(p,)) for p in pubs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert sorted(outcomes) == ["conflict", "conflict", "conflict", "ok"]
    assert setup.repo.current_targets_version() == 1


def test_expired_publication_is_refused(setup: Setup) -> None:
    with pytest.raises(ExpiredMetadataError, match="published targets v1 expired"):
        setup.accept(setup.publication(bundle_files(setup), expires_days=-1))


def test_file_that_differs_from_its_signed_hash_is_refused(setup: Setup) -> None:
    publication = setup.publication(bundle_files(setup))
    tampered = rewrite_tar(publication, {f"targets/{VARIANT}": os.urandom(5000)})
    before = setup.state()
    with pytest.raises(TargetMismatchError, match=VARIANT):
        setup.accept(tampered)
    assert setup.state() == before


def test_publication_missing_a_new_file_or_carrying_an_unlisted_one_is_refused(setup: Setup) -> None:
    publication = setup.publication(bundle_files(setup))
    with pytest.raises(ArchiveError, match="lacks the file of new target digits/3/onnx-int8.tar.gz"):
        setup.accept(rewrite_tar(publication, {f"targets/{VARIANT}": None}))
    extra = tarfile.TarInfo("targets/digits/3/extra.bin")
    extra.size = 3
    with pytest.raises(ArchiveError, match="do not list"):
        setup.accept(rewrite_tar(publication, {}, [extra]))


@pytest.mark.parametrize(
    ("name", "kind", "reason"),
    [
        ("targets/../../escape.txt", tarfile.REGTYPE, "path traversal"),
        ("/etc/cron.d/evil", tarfile.REGTYPE, "absolute path"),
        ("evil.txt", tarfile.REGTYPE, "outside targets/"),
        ("targets/digits/3/link", tarfile.SYMTYPE, "only regular files are allowed"),
        ("targets/digits/3/hard", tarfile.LNKTYPE, "only regular files are allowed"),
        ("targets/digits/3/fifo", tarfile.FIFOTYPE, "only regular files are allowed"),
    ],
)
def test_unsafe_archive_members_are_refused(setup: Setup, name: str, kind: bytes, reason: str) -> None:
    member = tarfile.TarInfo(name)
    member.type = kind
    member.size = 3 if kind == tarfile.REGTYPE else 0
    if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE):
        member.linkname = "../../../../etc/passwd"
    evil = rewrite_tar(setup.publication(bundle_files(setup)), {}, [member])
    with pytest.raises(ArchiveError, match=reason):
        setup.accept(evil)
    assert not (setup.tmp / "escape.txt").exists()


def test_size_limits_and_garbage_are_archive_errors(setup: Setup) -> None:
    publication = setup.publication(bundle_files(setup))
    with pytest.raises(ArchiveError, match="exceeds 1000 bytes"):
        setup.accept(publication, limits=PublicationLimits(max_member_bytes=1000))
    with pytest.raises(ArchiveError, match="exceeds 5005 bytes"):
        setup.accept(publication, limits=PublicationLimits(max_total_bytes=5005))
    with pytest.raises(ArchiveError, match="more than 2 members"):
        setup.accept(publication, limits=PublicationLimits(max_members=2))
    garbage = setup.tmp / "garbage.tar.gz"
    garbage.write_bytes(os.urandom(300))
    with pytest.raises(ArchiveError, match="not a readable tar.gz"):
        setup.accept(garbage)


def test_online_signers_must_be_the_keys_root_lists(setup: Setup) -> None:
    publication = setup.publication(bundle_files(setup))
    with pytest.raises(ConfigError, match="not a snapshot key"):
        setup.repo.accept_publication(publication, setup.timestamp_key, setup.timestamp_key)


def test_removing_a_target_needs_a_new_release_signed_version(setup: Setup) -> None:
    setup.accept(setup.publication(bundle_files(setup)))
    root = setup.repo.trusted_root()
    assert root is not None
    smaller = build_targets(setup.repo.current_targets(), root, {}, setup.release_key, remove=[VARIANT])
    assert setup.repo.remove_targets(smaller, setup.snapshot_key, setup.timestamp_key) == [VARIANT]
    assert setup.repo.target_paths() == [MANIFEST]
    with pytest.raises(UnknownTargetError):
        setup.repo.target_info(VARIANT)


# --- online roles ----------------------------------------------------------------------------------
def test_refresh_resigns_timestamp_and_snapshot_only_when_close_to_expiry(setup: Setup) -> None:
    setup.accept(setup.publication(bundle_files(setup)))
    ts = setup.timestamp_key
    assert setup.repo.refresh_timestamp(ts, if_expires_within_s=3600, snapshot_signer=setup.snapshot_key) == []
    assert setup.repo.refresh_timestamp(ts, if_expires_within_s=2 * 86400) == ["timestamp"]
    assert timedelta(hours=23) < setup.repo.expiries()["timestamp"] - utc_now() <= timedelta(days=1)
    done = setup.repo.refresh_timestamp(ts, snapshot_signer=setup.snapshot_key, snapshot_if_expires_within_s=8 * 86400)
    assert done == ["snapshot", "timestamp"]
    timestamp = Metadata.from_bytes(setup.repo.metadata_file("timestamp.json").read_bytes()).signed
    assert (timestamp.version, timestamp.snapshot_meta.version) == (3, 2)
    assert setup.repo.current_targets_version() == 1


def test_default_expiries_are_a_year_a_quarter_a_week_and_a_day() -> None:
    e = Expiry()
    assert (e.root, e.targets, e.snapshot, e.timestamp) == (
        timedelta(days=365),
        timedelta(days=90),
        timedelta(days=7),
        timedelta(days=1),
    )


def test_root_rotation_of_the_online_keys_resigns_snapshot_and_timestamp(setup: Setup) -> None:
    setup.accept(setup.publication(bundle_files(setup)))
    new_ts = generate_key(setup.tmp / "keys" / "timestamp2.key")
    root = setup.repo.trusted_root()
    assert root is not None
    v2 = next_root(root, [setup.root_key], timestamp_key=new_ts)
    with pytest.raises(ConfigError, match="changes the online keys"):
        setup.repo.rotate_root(v2)
    assert setup.repo.rotate_root(v2, setup.snapshot_key, new_ts) == 2
    timestamp = Metadata.from_bytes(setup.repo.metadata_file("timestamp.json").read_bytes())
    assert list(timestamp.signatures) == [new_ts.public_key.keyid]
    assert setup.repo.metadata_file("2.root.json").read_bytes() == v2 == setup.repo.trusted_root()


def test_root_rotation_not_signed_by_the_old_root_keys_is_refused(setup: Setup) -> None:
    intruder = CryptoSigner.generate_ed25519()
    v2 = make_root([intruder], [intruder], setup.snapshot_key, setup.timestamp_key, version=2)
    with pytest.raises(BadSignatureError, match="previous root"):
        setup.repo.rotate_root(v2)
    root = setup.repo.trusted_root()
    assert root is not None
    skip = next_root(next_root(root, [setup.root_key]), [setup.root_key])
    with pytest.raises(VersionConflictError, match="version 3, expected 2"):
        setup.repo.rotate_root(skip)


# --- serving -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name", ["../keys/root.key", "root.json/../../x", "0.root.json", "timestamp.json.bak", "1.timestamp.json.", ""]
)
def test_metadata_names_outside_the_tuf_set_are_unknown(setup: Setup, name: str) -> None:
    with pytest.raises(UnknownTargetError):
        setup.repo.metadata_file(name)


def test_target_paths_that_traverse_or_follow_links_are_unknown(setup: Setup) -> None:
    setup.accept(setup.publication(bundle_files(setup)))
    secret = setup.tmp / "secret.txt"
    secret.write_text("s")
    (setup.repo.targets_dir / "digits" / "link.txt").symlink_to(secret)
    for url_path in ["../keys/root.key", "digits/../../secret.txt", "/etc/passwd", "digits/link.txt", "digits//x"]:
        with pytest.raises(UnknownTargetError):
            setup.repo.target_file(url_path)
    assert setup.repo.metadata_file("1.root.json").is_file()


# --- the single-machine repository --------------------------------------------------------------------
def test_local_repository_keeps_its_keys_outside_the_served_directory(tmp_path: Path) -> None:
    local = LocalRepository.create(tmp_path / "repo")
    assert local.keys_dir == tmp_path / "repo-keys"
    assert sorted(p.name for p in local.keys_dir.glob("*.key")) == [
        "root.key",
        "snapshot.key",
        "targets.key",
        "timestamp.key",
    ]
    files = {"m/1/manifest.json": tmp_path / "m.json"}
    files["m/1/manifest.json"].write_text("{}")
    assert LocalRepository.open_or_create(tmp_path / "repo").publish(files) == ["m/1/manifest.json"]
    assert not any((tmp_path / "repo").rglob("*.key"))
    with pytest.raises(ConfigError, match="not a TUF repository"):
        LocalRepository.open(tmp_path / "elsewhere")


def test_prune_keeps_the_files_of_the_last_two_versions_only(setup: Setup) -> None:
    setup.accept(setup.publication(bundle_files(setup)))
    sha_old = setup.repo.target_info(VARIANT).hashes["sha256"]
    setup.accept(setup.publication(setup.files(**{"digits__4__onnx-int8.tar.gz": b"v4"}), remove=[VARIANT]))
    assert setup.repo.prune() == []  # digits/3's file is still listed by the previous version
    setup.accept(setup.publication(setup.files(**{"digits__5__onnx-int8.tar.gz": b"v5"})))
    assert setup.repo.prune() == [f"digits/3/{sha_old}.onnx-int8.tar.gz"]
    assert len(list(setup.repo.targets_dir.rglob("*.onnx-int8.tar.gz"))) == 2
    sha_now = setup.repo.target_info("digits/5/onnx-int8.tar.gz").hashes["sha256"]
    assert setup.repo.target_file(f"digits/5/{sha_now}.onnx-int8.tar.gz").read_bytes() == b"v5"


def test_a_publication_that_changes_the_bytes_of_a_published_target_is_refused(setup: Setup) -> None:
    setup.accept(setup.publication(bundle_files(setup)))
    before = setup.state()
    rewrite = setup.publication(setup.files(**{"digits__3__onnx-int8.tar.gz": b"other bytes"}))
    with pytest.raises(TargetRewriteError, match="digits/3/onnx-int8.tar.gz is already published"):
        setup.accept(rewrite)
    assert setup.state() == before
    same_bytes_again = setup.publication(setup.files(**{"digits__4__manifest.json": b'{"v": 4}'}))
    assert setup.accept(same_bytes_again) == ["digits/4/manifest.json"]


def test_a_root_whose_online_keys_are_not_the_servers_is_refused_before_install(tmp_path: Path) -> None:
    root_key, release, snapshot, timestamp, other = (CryptoSigner.generate_ed25519() for _ in range(5))
    repo = TufRepository(tmp_path / "repo")
    stale = make_root([root_key], [release], snapshot, other)  # made with an old timestamp key
    with pytest.raises(ConfigError, match="not a timestamp key of root v1"):
        repo.rotate_root(stale, snapshot, timestamp)
    assert repo.trusted_root() is None
    assert repo.rotate_root(make_root([root_key], [release], snapshot, timestamp), snapshot, timestamp) == 1
