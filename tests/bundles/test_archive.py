"""Bundle archives: deterministic packing, verified unpacking, and every unsafe archive refused."""

from __future__ import annotations

import gzip
import io
import os
import shutil
import tarfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bundles.archive import (
    ArchiveLimits,
    max_archive_bytes,
    open_bundle,
    open_variant,
    pack_bundle,
    pack_variant,
    read_manifest,
    unpack,
    verify_files,
)
from bundles.canonical import sha256_bytes, sha256_file
from bundles.errors import ArchiveError, BundleError, ConfigError, IntegrityError
from bundles.manifest import Manifest

Bundle = tuple[Manifest, Path]
FLIP_SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))


def make_tar_gz(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    """Write a tar.gz with exactly the given headers (and data), however malicious."""
    with tarfile.open(path, "w:gz") as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def member(name: str, data: bytes | None = b"payload", kind: bytes = tarfile.REGTYPE, link: str = "") -> Any:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    return info, data


def bundle_members(root: Path, manifest: Manifest) -> list[tuple[str, bytes]]:
    files = [f.path for v in manifest.variants for f in v.files]
    return [("manifest.json", (root / "manifest.json").read_bytes())] + [(p, (root / p).read_bytes()) for p in files]


def tar_of(path: Path, contents: list[tuple[str, bytes]]) -> Path:
    return make_tar_gz(path, [member(name, data) for name, data in contents])


def flip(data: bytes, offset: int) -> bytes:
    return data[:offset] + bytes([data[offset] ^ 0xFF]) + data[offset + 1 :]


# --- packing ------------------------------------------------------------------------------------


def test_pack_bundle_gives_the_same_bytes_for_the_same_inputs(bundle: Bundle, tmp_path: Path) -> None:
    manifest, root = bundle
    first = pack_bundle(root, manifest, tmp_path / "a.efb").read_bytes()
    for path in root.rglob("*"):
        os.utime(path, (1_000_000, 1_000_000))  # other mtimes must not matter
    second = pack_bundle(root, manifest, tmp_path / "b.efb").read_bytes()
    assert first == second
    assert first[4:8] == b"\0\0\0\0"  # gzip header mtime is zero


def test_packed_members_are_sorted_regular_files_with_fixed_metadata(bundle: Bundle, tmp_path: Path) -> None:
    manifest, root = bundle
    with tarfile.open(pack_bundle(root, manifest, tmp_path / "a.efb")) as tar:
        infos = tar.getmembers()
    assert [i.name for i in infos] == sorted(["manifest.json"] + [f.path for v in manifest.variants for f in v.files])
    assert {(i.type, i.mtime, i.uid, i.gid, i.mode, i.uname) for i in infos} == {(tarfile.REGTYPE, 0, 0, 0, 0o644, "")}


def test_open_bundle_restores_the_bundle_and_returns_its_manifest(bundle: Bundle, tmp_path: Path) -> None:
    manifest, root = bundle
    archive = pack_bundle(root, manifest, tmp_path / "a.efb")
    opened, dest = open_bundle(archive, tmp_path / "out", expected_manifest_sha256=sha256_bytes(manifest.to_bytes()))
    assert opened == manifest
    assert dest == tmp_path / "out"
    for ref in (f for v in manifest.variants for f in v.files):
        assert sha256_file(dest / ref.path) == ref.sha256


def test_pack_variant_holds_only_that_variant_and_open_variant_makes_a_loadable_dir(
    bundle: Bundle, tmp_path: Path
) -> None:
    manifest, root = bundle
    archive = pack_variant(root, manifest, "onnx-fp16", tmp_path / "v.tar.gz")
    assert pack_variant(root, manifest, "onnx-fp16", tmp_path / "w.tar.gz").read_bytes() == archive.read_bytes()
    assert unpack(archive, tmp_path / "raw") == ["onnx-fp16/model.onnx"]
    slot = open_variant(archive, tmp_path / "slot", manifest, "onnx-fp16")
    assert read_manifest(slot) == manifest
    verify_files(slot, manifest.variant("onnx-fp16").files)


def test_packing_refuses_a_bundle_whose_files_do_not_match(bundle: Bundle, tmp_path: Path) -> None:
    manifest, root = bundle
    model = root / manifest.variants[0].entry
    model.write_bytes(flip(model.read_bytes(), 10))
    with pytest.raises(IntegrityError, match="onnx-fp32/model.onnx"):
        pack_bundle(root, manifest, tmp_path / "a.efb")
    assert not (tmp_path / "a.efb").exists()


# --- integrity: one flipped byte anywhere is refused ------------------------------------------------


@FLIP_SETTINGS
@given(data=st.data())
def test_one_flipped_byte_in_any_variant_file_is_rejected(
    pristine_bundle: Bundle, tmp_path_factory: pytest.TempPathFactory, data: st.DataObject
) -> None:
    manifest, root = pristine_bundle
    work = tmp_path_factory.mktemp("flip")
    contents = bundle_members(root, manifest)
    index = data.draw(st.integers(1, len(contents) - 1), label="file")
    name, payload = contents[index]
    contents[index] = (name, flip(payload, data.draw(st.integers(0, len(payload) - 1), label="offset")))
    with pytest.raises(IntegrityError, match=name):
        open_bundle(tar_of(work / "x.efb", contents), work / "out")
    assert not (work / "out").exists()


@FLIP_SETTINGS
@given(offset=st.integers(0, 10_000))
def test_one_flipped_byte_in_manifest_json_is_rejected(
    pristine_bundle: Bundle, tmp_path_factory: pytest.TempPathFactory, offset: int
) -> None:
    manifest, root = pristine_bundle
    work = tmp_path_factory.mktemp("flip")
    contents = bundle_members(root, manifest)
    expected = sha256_bytes(contents[0][1])
    contents[0] = ("manifest.json", flip(contents[0][1], offset % len(contents[0][1])))
    with pytest.raises(BundleError):
        open_bundle(tar_of(work / "x.efb", contents), work / "out", expected_manifest_sha256=expected)
    assert not (work / "out").exists()


@FLIP_SETTINGS
@given(data=st.data())
def test_one_flipped_byte_in_the_compressed_archive_is_rejected(
    pristine_bundle: Bundle, tmp_path_factory: pytest.TempPathFactory, data: st.DataObject
) -> None:
    manifest, root = pristine_bundle
    work = tmp_path_factory.mktemp("flip")
    raw = pack_bundle(root, manifest, work / "good.efb").read_bytes()
    offset = data.draw(st.integers(10, len(raw) - 1), label="offset")  # past the gzip header's free-form fields
    (work / "bad.efb").write_bytes(flip(raw, offset))
    with pytest.raises(BundleError):
        open_bundle(work / "bad.efb", work / "out")
    assert not (work / "out").exists()


def test_verify_files_names_a_missing_a_resized_and_a_changed_file(bundle: Bundle) -> None:
    manifest, root = bundle
    fp32, fp16 = (root / v.entry for v in manifest.variants)
    fp16.write_bytes(flip(fp16.read_bytes(), 3))
    with pytest.raises(IntegrityError, match="onnx-fp16/model.onnx': sha256"):
        verify_files(root, manifest.variant("onnx-fp16").files)
    fp32.write_bytes(fp32.read_bytes() + b"x")
    with pytest.raises(IntegrityError, match="onnx-fp32/model.onnx': .* bytes, the manifest says"):
        verify_files(root, manifest.variant("onnx-fp32").files)
    fp32.unlink()
    with pytest.raises(IntegrityError, match="onnx-fp32/model.onnx' is missing"):
        verify_files(root, manifest.variant("onnx-fp32").files)


def test_a_symlink_in_place_of_a_file_fails_verification(bundle: Bundle, tmp_path: Path) -> None:
    manifest, root = bundle
    entry = root / manifest.variants[0].entry
    shutil.move(entry, tmp_path / "real.onnx")
    entry.symlink_to(tmp_path / "real.onnx")
    with pytest.raises(IntegrityError, match="not a regular file"):
        verify_files(root, manifest.variants[0].files)


def test_open_bundle_refuses_files_the_manifest_does_not_list(bundle: Bundle, tmp_path: Path) -> None:
    manifest, root = bundle
    contents = bundle_members(root, manifest) + [("extra/run.sh", b"#!/bin/sh\n")]
    with pytest.raises(IntegrityError, match="extra/run.sh"):
        open_bundle(tar_of(tmp_path / "x.efb", contents), tmp_path / "out")


# --- unsafe archives ----------------------------------------------------------------------------

UNSAFE: list[tuple[str, list[Any], str]] = [
    ("path traversal", [member("ok.txt"), member("../evil.txt")], "path traversal"),
    ("nested traversal", [member("a/../../evil.txt")], "path traversal"),
    ("absolute path", [member("/tmp/evil.txt")], "absolute path"),
    ("windows absolute path", [member("C:\\evil.txt")], "absolute path"),
    ("symlink escaping", [member("link", None, tarfile.SYMTYPE, "/etc/passwd")], "is a link"),
    ("relative symlink escaping", [member("link", None, tarfile.SYMTYPE, "../../etc")], "is a link"),
    ("hardlink", [member("ok.txt"), member("hard", None, tarfile.LNKTYPE, "/etc/passwd")], "is a link"),
    ("character device", [member("dev", None, tarfile.CHRTYPE)], "special file"),
    ("fifo", [member("fifo", None, tarfile.FIFOTYPE)], "special file"),
    ("duplicate member", [member("a.txt"), member("a.txt", b"other")], "appears twice"),
]


@pytest.mark.parametrize(("case", "members", "message"), UNSAFE, ids=[c[0] for c in UNSAFE])
def test_unsafe_archive_is_rejected_and_leaves_nothing_behind(
    tmp_path: Path, case: str, members: list[Any], message: str
) -> None:
    archive = make_tar_gz(tmp_path / "evil.tar.gz", members)
    parent = tmp_path / "dest"
    parent.mkdir()
    with pytest.raises(ArchiveError, match=message):
        unpack(archive, parent / "slot")
    assert list(parent.iterdir()) == []  # neither the destination nor a temporary directory
    assert not (tmp_path / "evil.txt").exists()


LIMITED: list[tuple[str, list[Any], ArchiveLimits, str]] = [
    ("oversize member", [member("big", b"x" * 2000)], ArchiveLimits(10_000, 1000, 10), "exceeds 1000 bytes"),
    (
        "total over the cap",
        [member(f"f{i}", b"x" * 900) for i in range(5)],
        ArchiveLimits(4000, 1000, 10),
        "content exceeds 4000 bytes",
    ),
    ("too many members", [member(f"f{i}", b"") for i in range(11)], ArchiveLimits(10_000, 1000, 10), "more than 10"),
    ("gzip bomb", [member("zeros", bytes(5_000_000))], ArchiveLimits(1_000_000, 10_000_000, 10), "content exceeds"),
]


@pytest.mark.parametrize(("case", "members", "limits", "message"), LIMITED, ids=[c[0] for c in LIMITED])
def test_archive_over_a_limit_is_rejected(
    tmp_path: Path, case: str, members: list[Any], limits: ArchiveLimits, message: str
) -> None:
    archive = make_tar_gz(tmp_path / "big.tar.gz", members)
    with pytest.raises(ArchiveError, match=message):
        unpack(archive, tmp_path / "slot", limits)
    assert not (tmp_path / "slot").exists()


def test_bytes_beyond_a_members_declared_size_are_neither_extracted_nor_accepted(tmp_path: Path) -> None:
    """A header that understates its data leaves the rest where headers are expected: refused."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        info, _ = member("small")
        info.size = 10
        tar.addfile(info, io.BytesIO(b"y" * 10))
    body = bytearray(raw.getvalue())
    body[512 + 10 : 512 + 5000] = b"z" * 4990  # the real data runs on past the declared 10 bytes
    (tmp_path / "lie.tar.gz").write_bytes(gzip.compress(bytes(body)))
    with pytest.raises(ArchiveError, match="data after the end of the archive"):
        unpack(tmp_path / "lie.tar.gz", tmp_path / "slot", ArchiveLimits(100_000, 100, 10))
    assert not (tmp_path / "slot").exists()


@pytest.mark.parametrize(
    ("payload", "message"),
    [(b"not an archive at all", "not a readable tar.gz"), (gzip.compress(b"plain text"), "not a readable tar.gz")],
)
def test_unreadable_archives_are_an_archive_error(tmp_path: Path, payload: bytes, message: str) -> None:
    (tmp_path / "x.tar.gz").write_bytes(payload)
    with pytest.raises(ArchiveError, match=message):
        unpack(tmp_path / "x.tar.gz", tmp_path / "slot")


def test_a_missing_archive_is_an_archive_error(tmp_path: Path) -> None:
    with pytest.raises(ArchiveError, match="does not exist"):
        unpack(tmp_path / "nope.tar.gz", tmp_path / "slot")


def test_unpacking_into_a_non_empty_directory_is_refused(tmp_path: Path) -> None:
    archive = make_tar_gz(tmp_path / "a.tar.gz", [member("a.txt")])
    (tmp_path / "slot").mkdir()
    (tmp_path / "slot" / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not an empty directory"):
        unpack(archive, tmp_path / "slot")
    assert (tmp_path / "slot" / "keep.txt").read_text() == "mine"


def test_directories_and_dot_prefixed_names_are_accepted(tmp_path: Path) -> None:
    folder = tarfile.TarInfo("./pkg.mlpackage")
    folder.type = tarfile.DIRTYPE
    archive = make_tar_gz(tmp_path / "a.tar.gz", [(folder, None), member("./pkg.mlpackage/Manifest.json", b"{}")])
    assert unpack(archive, tmp_path / "slot") == ["pkg.mlpackage/Manifest.json"]
    assert (tmp_path / "slot" / "pkg.mlpackage" / "Manifest.json").read_bytes() == b"{}"


NAME_PARTS = st.sampled_from(["a", "b", "..", ".", "", "/", "c.txt", "C:", "\\"])
KINDS = st.sampled_from([tarfile.REGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE])


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(st.tuples(st.lists(NAME_PARTS, min_size=1, max_size=4), KINDS), min_size=1, max_size=5))
def test_no_archive_writes_outside_its_destination(
    tmp_path_factory: pytest.TempPathFactory, spec: list[tuple[list[str], bytes]]
) -> None:
    work = tmp_path_factory.mktemp("fuzz")
    members = []
    for parts, kind in spec:
        name = "/".join(parts) or "x"
        is_file = kind == tarfile.REGTYPE
        members.append(
            member(name, b"data" if is_file else None, kind, "../../outside" if kind in (b"1", b"2") else "")
        )
    archive = make_tar_gz(work / "fuzz.tar.gz", members)
    (work / "dest").mkdir()
    try:
        extracted = unpack(archive, work / "dest" / "slot")
    except ArchiveError:
        assert list((work / "dest").iterdir()) == []
    else:
        slot = (work / "dest" / "slot").resolve()
        for name in extracted:
            path = (slot / name).resolve()
            assert path.is_relative_to(slot) and path.is_file() and not (slot / name).is_symlink()
    assert sorted(p.name for p in work.iterdir()) == ["dest", "fuzz.tar.gz"]


# --- unpacking a variant against its manifest ---------------------------------------------------------


class WriteSpy:
    """Records which members reach the writer (wrapping the real one), to show what was refused first."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        import bundles.archive as archive

        self.written: list[str] = []
        real = archive._write_member

        def spy(tar: Any, info: Any, root: Path, name: str, budget: Any) -> None:
            self.written.append(name)
            real(tar, info, root, name, budget)

        monkeypatch.setattr(archive, "_write_member", spy)


def test_open_variant_refuses_an_undeclared_member_before_writing_it(
    bundle: Bundle, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    manifest, root = bundle
    model = manifest.variant("onnx-fp16").files[0]
    archive = tar_of(
        tmp_path / "v.tar.gz", [("aaa-extra.bin", b"x" * 4096), (model.path, (root / model.path).read_bytes())]
    )
    spy = WriteSpy(monkeypatch)
    with pytest.raises(IntegrityError, match="member 'aaa-extra.bin' is not a file the manifest declares"):
        open_variant(archive, tmp_path / "slot", manifest, "onnx-fp16")
    assert spy.written == [] and not (tmp_path / "slot").exists()


def test_open_variant_refuses_a_member_bigger_than_declared_at_its_header(
    bundle: Bundle, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    manifest, _ = bundle
    model = manifest.variant("onnx-fp16").files[0]
    huge = bytes(10 << 20)  # 10 MiB of zeros: ~10 KiB compressed, within the archive-size bound
    archive = tar_of(tmp_path / "v.tar.gz", [(model.path, huge)])
    spy = WriteSpy(monkeypatch)
    with pytest.raises(IntegrityError, match=f"is {len(huge)} bytes, the manifest declares {model.size_bytes}"):
        open_variant(archive, tmp_path / "slot", manifest, "onnx-fp16")
    assert spy.written == [] and not (tmp_path / "slot").exists()


def test_an_archive_file_bigger_than_its_declared_files_can_be_is_refused_unread(
    bundle: Bundle, tmp_path: Path
) -> None:
    manifest, root = bundle
    variant = manifest.variant("onnx-fp16")
    archive = pack_variant(root, manifest, "onnx-fp16", tmp_path / "v.tar.gz")
    bound = max_archive_bytes(f.size_bytes for f in variant.files)
    assert archive.stat().st_size < bound  # an honest archive is well within the bound
    with open(archive, "ab") as f:
        f.write(os.urandom(bound - archive.stat().st_size + 1))
    with pytest.raises(ArchiveError, match=f"archive file exceeds {bound} bytes"):
        open_variant(archive, tmp_path / "slot", manifest, "onnx-fp16")


@given(sizes=st.lists(st.integers(0, 300_000), min_size=1, max_size=4))
@settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
def test_max_archive_bytes_holds_any_packed_incompressible_files(sizes: list[int]) -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as temp:
        out = Path(temp) / "a.tar.gz"
        from bundles.archive import _write_archive

        _write_archive([(f"f{i}.bin", os.urandom(size)) for i, size in enumerate(sizes)], out)
        assert out.stat().st_size <= max_archive_bytes(sizes)
