"""The release workstation trusts its own record: the pinned root and the ledger (``converter.trust``).

Local TUF repositories (``--repo``) stand in for the server here (same code path, no network); the
attacks through a real fleet server and the real CLIs are in ``tests/e2e/test_release_integrity.py``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from tuf.api.metadata import Metadata, Targets

from bundles.errors import ConfigError, UntrustedRecordError
from bundles.testing import build_bundle_dir
from bundles.tuf import keys as tuf_keys
from bundles.tuf.repository import LocalRepository
from bundles.tuf.root import next_root
from converter.home import Home
from converter.publish import (
    Plan,
    RepoDestination,
    export_team_ledger,
    import_team_ledger,
    init_keys,
    publish_bundle,
    release_signer,
    set_floor,
)
from converter.trust import TrustStore, repo_destination
from tests.converter.helpers import cli


def yes(plan: Plan) -> bool:
    return True


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    root = tmp_path_factory.mktemp("bundles")
    return {v: _bundle(root / f"tiny-{v}", v) for v in (1, 2, 3)}


def _bundle(path: Path, version: int) -> Path:
    build_bundle_dir(path, name="tiny", version=version, seed=version)
    return path


def workstation(tmp_path: Path, name: str = "a") -> Home:
    home = Home(tmp_path / name)
    init_keys(home)
    return home


def teammate(home: Home, tmp_path: Path) -> Home:
    """Another workstation with a copy of the targets key, no root key (and the local repository's online
    keys, which a fleet server would hold)."""
    other = Home(tmp_path / "teammate")
    other.keys_dir.mkdir(parents=True, mode=0o700)
    for name in ("targets.key", "targets.key.pub.json", "snapshot.key", "timestamp.key"):
        shutil.copy2(home.keys_dir / name, other.keys_dir / name)
    return other


def publish(home: Home, repo: Path, bundle_dir: Path) -> Plan:
    released = publish_bundle(home, RepoDestination(home, repo), bundle_dir, yes)
    assert released.signed
    return released.plan


def current_targets(repo: Path) -> Targets:
    raw = RepoDestination(Home(repo), repo).current_targets()
    assert raw is not None
    return Metadata[Targets].from_bytes(raw).signed


def test_the_first_publication_pins_the_root_and_records_every_signed_target(
    tmp_path: Path, bundles: dict[int, Path]
) -> None:
    home, repo = workstation(tmp_path), tmp_path / "repo"
    plan = publish(home, repo, bundles[1])
    assert plan.version == 1 and plan.removed == [] and plan.from_server is None
    store = TrustStore(home, repo_destination(repo))
    assert store.pinned_root() == (repo / "metadata" / "1.root.json").read_bytes()
    ledger = store.ledger()
    assert ledger.targets_version == 1 and sorted(ledger.targets) == plan.added
    assert ledger.targets["tiny/1/manifest.json"]["signed_in"] == 1
    assert (store.dir / "ledger.json").stat().st_mode & 0o077 == 0


def test_a_repository_whose_targets_diverge_from_the_ledger_at_the_same_version_is_refused(
    tmp_path: Path, bundles: dict[int, Path]
) -> None:
    home, repo = workstation(tmp_path), tmp_path / "repo"
    publish(home, repo, bundles[1])
    shutil.copytree(repo, tmp_path / "backup")
    publish(home, repo, bundles[2])  # this workstation signs v2 = tiny 1, 2
    shutil.rmtree(repo)
    shutil.copytree(tmp_path / "backup", repo)  # the repository is restored from a backup...
    other = teammate(home, tmp_path)
    TrustStore(other, repo_destination(repo)).pin_root((repo / "metadata" / "1.root.json").read_bytes())
    publish(other, repo, bundles[3])  # ...and someone else signs another v2 = tiny 1, 3
    with pytest.raises(UntrustedRecordError) as refused:
        publish(home, repo, bundles[3])
    message = str(refused.value)
    assert "differ from the v2 this workstation signed" in message
    assert "not in the ledger: tiny/3/manifest.json" in message and "missing: tiny/2/manifest.json" in message


def test_an_entry_added_to_the_repository_is_refused_and_nothing_is_signed(
    tmp_path: Path, bundles: dict[int, Path]
) -> None:
    home, repo = workstation(tmp_path), tmp_path / "repo"
    publish(home, repo, bundles[1])
    path = repo / "metadata" / "1.targets.json"
    data = json.loads(path.read_bytes())
    data["signed"]["targets"]["evil/1/manifest.json"] = data["signed"]["targets"]["tiny/1/manifest.json"]
    path.write_text(json.dumps(data))
    before = sorted(p.name for p in (repo / "metadata").iterdir())
    with pytest.raises(UntrustedRecordError, match="never signed: evil/1/manifest.json; nothing was signed"):
        publish(home, repo, bundles[2])
    assert sorted(p.name for p in (repo / "metadata").iterdir()) == before
    assert TrustStore(home, repo_destination(repo)).ledger().targets_version == 1


def test_a_teammates_release_key_signed_version_is_accepted_and_shown_as_signed_elsewhere(
    tmp_path: Path, bundles: dict[int, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    home, repo = workstation(tmp_path), tmp_path / "repo"
    publish(home, repo, bundles[1])
    monkeypatch.setenv("EDGEFLEET_HOME", str(home.root))
    assert cli("ledger", "export", tmp_path / "team.json", "--repo", repo)[0] == 0
    other = teammate(home, tmp_path)
    monkeypatch.setenv("EDGEFLEET_HOME", str(other.root))
    code, out, err = cli("ledger", "import", tmp_path / "team.json")
    assert code == 0 and f"ledger of {repo_destination(repo)} imported: targets v1" in out, err
    publish(other, repo, bundles[2])  # the teammate signs v2...
    assert set_floor(other, RepoDestination(other, repo), "tiny", 2, yes).signed  # ...and a floor in v3
    shown = json.loads(cli("ledger", "show", "--repo", repo, "--json")[1])
    assert shown["targets_version"] == 3 and "tiny/2/manifest.json" in shown["targets"]

    plan = publish(home, repo, bundles[3])  # this workstation's ledger is at v1
    assert plan.version == 4 and plan.from_server is not None
    assert plan.from_server.version == 3 and plan.from_server.removed == []
    assert plan.from_server.added == ["tiny/2/manifest.json", "tiny/2/onnx-fp32.tar.gz"]
    assert plan.floors == {"tiny": 2} and plan.changed == []  # the teammate's floor is kept, not undone
    assert plan.listed["tiny/3/manifest.json"].custom["edgefleet"]["min_version"] == 2
    ledger = TrustStore(home, repo_destination(repo)).ledger()
    hows = [h["how"] for h in ledger.history]
    assert hows == ["signed here: tiny@1", "verified on the server", "signed here: tiny@3"]
    assert {p.split("/")[1] for p in ledger.targets} == {"1", "2", "3"}


def test_a_ledger_export_not_signed_by_a_trusted_targets_key_or_older_than_the_ledger_is_refused(
    tmp_path: Path, bundles: dict[int, Path]
) -> None:
    home, repo = workstation(tmp_path), tmp_path / "repo"
    publish(home, repo, bundles[1])
    export = export_team_ledger(home, repo_destination(repo), tmp_path / "team.json").read_bytes()
    stranger = workstation(tmp_path, "stranger")  # its own, different targets key
    with pytest.raises(UntrustedRecordError, match="not signed by a targets key this workstation trusts"):
        import_team_ledger(stranger, export)
    forged = json.loads(export)
    forged["signed"]["ledger"]["targets"]["evil/1/manifest.json"] = forged["signed"]["ledger"]["targets"][
        "tiny/1/manifest.json"
    ]
    with pytest.raises(UntrustedRecordError):
        import_team_ledger(home, json.dumps(forged).encode())
    publish(home, repo, bundles[2])
    with pytest.raises(ConfigError, match="older than this workstation's v2"):
        import_team_ledger(home, export)


def test_a_root_this_workstations_root_key_did_not_sign_is_never_pinned(
    tmp_path: Path, bundles: dict[int, Path]
) -> None:
    repo = tmp_path / "repo"
    LocalRepository.create(repo, tmp_path / "other-keys")  # a repository made with someone else's keys
    home = workstation(tmp_path)
    with pytest.raises(UntrustedRecordError, match="is not a root this workstation signed"):
        publish(home, repo, bundles[1])
    assert TrustStore(home, repo_destination(repo)).pinned_root() is None


def test_a_root_rotation_signed_by_the_release_root_key_is_followed(tmp_path: Path, bundles: dict[int, Path]) -> None:
    home, repo = workstation(tmp_path), tmp_path / "repo"
    publish(home, repo, bundles[1])
    destination = RepoDestination(home, repo)
    new_timestamp = tuf_keys.generate_key(tmp_path / "timestamp.new")
    rotated = next_root(destination.current_root() or b"", [release_signer(home, "root")],
                        timestamp_key=new_timestamp.public_key)  # fmt: skip
    snapshot = tuf_keys.load_signer(home.keys_dir / "snapshot.key")
    destination.repository.rotate_root(rotated, snapshot, new_timestamp)
    shutil.copy2(tmp_path / "timestamp.new", home.keys_dir / "timestamp.key")
    publish(home, repo, bundles[2])
    assert TrustStore(home, repo_destination(repo)).pinned_root() == rotated


def test_a_publication_whose_answer_was_lost_is_recognised_as_this_workstations_own(
    tmp_path: Path, bundles: dict[int, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    home, repo = workstation(tmp_path), tmp_path / "repo"
    publish(home, repo, bundles[1])
    real = TrustStore.save_ledger

    def crash(self: TrustStore, ledger: object) -> None:
        raise OSError("power cut before the ledger was saved")

    monkeypatch.setattr(TrustStore, "save_ledger", crash)
    with pytest.raises(OSError):
        publish(home, repo, bundles[2])  # signed and accepted as v2, but the ledger still says v1
    monkeypatch.setattr(TrustStore, "save_ledger", real)
    plan = publish(home, repo, bundles[3])
    assert plan.version == 3 and plan.from_server is None  # v2 is ours: not shown as signed elsewhere
    history = TrustStore(home, repo_destination(repo)).ledger().history
    assert [h["how"] for h in history] == ["signed here: tiny@1", "signed here", "signed here: tiny@3"]


def test_floor_and_revoke_show_the_plan_and_sign_only_with_yes(
    tmp_path: Path, bundles: dict[int, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    home, repo = workstation(tmp_path), tmp_path / "repo"
    monkeypatch.setenv("EDGEFLEET_HOME", str(home.root))
    publish(home, repo, bundles[1])
    publish(home, repo, bundles[2])
    signed_before = sorted((repo / "metadata").glob("*.targets.json"))

    code, out, err = cli("floor", "tiny@2", "--repo", repo, "--json")
    assert code == 2 and "not signed: rerun with --yes" in err and len(err.strip().splitlines()) == 1
    shown = json.loads(out)
    assert shown["signed"] is False and shown["plan"]["floors"] == {"tiny": 2}
    assert "tiny/1/manifest.json" in shown["plan"]["changed"]
    assert sorted((repo / "metadata").glob("*.targets.json")) == signed_before

    code, _, err = cli("floor", "tiny@7", "--repo", repo, "--yes")
    assert code == 2 and "tiny@7 is not published there" in err
    code, out, _ = cli("floor", "tiny@2", "--repo", repo, "--yes")
    assert code == 0 and "~ tiny/1/manifest.json" in out and "floors: tiny >= 2" in out
    stamped = current_targets(repo).targets
    assert {t.custom["edgefleet"]["min_version"] for t in stamped.values()} == {2}

    code, out, _ = cli("revoke", "tiny@1", "--repo", repo, "--yes")
    assert code == 0 and "- tiny/1/manifest.json" in out
    assert sorted(current_targets(repo).targets) == [p for p in sorted(stamped) if p.startswith("tiny/2/")]
    code, _, err = cli("revoke", "tiny@1", "--repo", repo, "--yes")
    assert code == 2 and "list nothing under tiny/1/" in err
