"""Property: no single-byte change to signed metadata gets past verification with different content."""

from __future__ import annotations

import itertools
from collections.abc import Callable

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tuf.api.metadata import Metadata, Root, Snapshot, Targets, Timestamp

from bundles.errors import MixAndMatchError, TrustError
from bundles.tuf.client import TufClient
from bundles.tuf.common import parse_metadata, verify_signatures
from bundles.tuf.testing import FileServer
from tests.bundles.tuf.conftest import VARIANT, Repo

_counter = itertools.count()


def mutate(data: bytes, index: int, new_byte: int) -> bytes:
    return data[:index] + bytes([new_byte]) + data[index + 1 :]


@st.composite
def one_byte_mutation(draw: st.DrawFn, length: int) -> tuple[int, int]:
    index = draw(st.integers(0, length - 1))
    return index, draw(st.integers(0, 255))


ROLE_FILES = {
    "root": "1.root.json",
    "targets": "1.targets.json",
    "snapshot": "1.snapshot.json",
    "timestamp": "timestamp.json",
}
ROLE_TYPES = {"root": Root, "targets": Targets, "snapshot": Snapshot, "timestamp": Timestamp}


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), role=st.sampled_from(sorted(ROLE_FILES)))
def test_mutated_metadata_of_any_role_is_rejected_unless_its_signed_content_is_unchanged(
    repo: Repo, data: st.DataObject, role: str
) -> None:
    original = (repo.local.repository.metadata_dir / ROLE_FILES[role]).read_bytes()
    root = parse_metadata(repo.root(), Root, "root").signed
    index, new_byte = data.draw(one_byte_mutation(len(original)))
    mutated = mutate(original, index, new_byte)
    try:
        md = parse_metadata(mutated, ROLE_TYPES[role], f"mutated {role}")
        verify_signatures(root, role, md, f"mutated {role}")
    except TrustError:
        return
    # Accepted: only possible when the signed part is byte-for-byte what the key signed
    # (e.g. an upper-case hex digit in the signature, which decodes to the same signature).
    assert md.signed_bytes == Metadata.from_bytes(original).signed_bytes


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), role_file=st.sampled_from(["/1.snapshot.json", "/1.targets.json", "/timestamp.json"]))
def test_client_rejects_any_single_byte_change_to_served_metadata(
    repo: Repo, server: FileServer, make_client: Callable[..., TufClient], data: st.DataObject, role_file: str
) -> None:
    original = (repo.local.repository.metadata_dir / role_file.lstrip("/")).read_bytes()
    index, new_byte = data.draw(one_byte_mutation(len(original)))
    mutated = mutate(original, index, new_byte)
    server.clear_faults()
    server.serve_bytes(role_file, mutated)
    client = make_client(f"device-{next(_counter)}")
    try:
        client.download(VARIANT)
    except MixAndMatchError:
        assert role_file != "/timestamp.json" and mutated != original  # pinned by the parent's sha256
        return
    except TrustError:
        return
    # Accepted: the bytes are unchanged, or (timestamp only, it has no parent hash) the signed content is.
    assert mutated == original or (
        role_file == "/timestamp.json"
        and Metadata.from_bytes(mutated).signed_bytes == Metadata.from_bytes(original).signed_bytes
    )
