"""One suite for the checkpoint store, run against every kind of store.

Each test runs on a local folder, on fsspec's memory filesystem and on S3
(moto's server over HTTP, see s3server.py).
"""

from __future__ import annotations

import hashlib
import os
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from s3server import S3Server, s3_server, s3_store  # noqa: F401 (fixtures)

from jobrunner.errors import CheckpointCorrupted, CommitConflict, StoreError
from jobrunner.store import (
    HASH_CHUNK,
    BlobParts,
    CheckpointStore,
    Manifest,
    SessionKey,
    blob_digest,
    session_key,
    split_blob,
)


@pytest.fixture(params=["file", "memory", "s3"])
def store_location(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[tuple[str, dict[str, str]]]:
    """A store's URL and options: a folder, a memory root, or an S3 bucket."""
    if request.param == "file":
        yield str(tmp_path / "store"), {}
    elif request.param == "memory":
        root = f"memory://jobrunner-{uuid.uuid4().hex}"
        yield root, {}
        import fsspec

        memory = fsspec.filesystem("memory")
        if memory.exists(root):  # a test that wrote nothing left no folder
            memory.rm(root, recursive=True)
    else:
        server: S3Server = request.getfixturevalue("s3_server")
        server.reset_faults()
        bucket = server.new_bucket()
        yield f"s3://{bucket}/store", {"endpoint_url": server.endpoint}


@pytest.fixture
def store(store_location: tuple[str, dict[str, str]]) -> CheckpointStore:
    url, options = store_location
    return CheckpointStore(url, options=options)


def _manifest(session: str, step: int, blob: str, note: str = "") -> Manifest:
    return Manifest(
        session=session,
        step=step,
        variables={"x": {"blob": blob, "type": "int", "size": 1, "needs": []}},
        blobs={blob: {"size": 1, "pickler": "pickle"}},
        result={"attempt": note},
    )


def test_a_blob_comes_back_as_written(store: CheckpointStore) -> None:
    digest = blob_digest(b"hello")
    assert store.write_blob(b"hello") == 5
    assert store.write_blob(b"hello", digest) == 0  # already there
    assert bytes(store.read_blob(digest)) == b"hello"


def test_a_blob_in_parts_is_read_back_whole_and_writable(
    store: CheckpointStore,
) -> None:
    large = bytearray(os.urandom(HASH_CHUNK * 2 + 12345))
    parts = BlobParts(b"stream", [large, memoryview(b"x" * 100)])
    digest = blob_digest(parts)
    assert store.write_blob(parts, digest) == len(parts)
    data = store.read_blob(digest)
    stream, buffers = split_blob(data)
    assert bytes(stream) == b"stream"
    assert buffers[0] == large and bytes(buffers[1]) == b"x" * 100
    assert not buffers[0].readonly
    assert blob_digest(bytes(data)) == digest  # one digest, however written


def test_a_changed_blob_is_refused(store: CheckpointStore) -> None:
    digest = blob_digest(b"original")
    store.write_blob(b"original", digest)
    store.files.write(f"blobs/{digest[:2]}/{digest}", b"tampered")
    with pytest.raises(CheckpointCorrupted, match=digest) as caught:
        store.read_blob(digest, session="s", name="x")
    assert "'x'" in str(caught.value)


def test_a_missing_blob_is_refused(store: CheckpointStore) -> None:
    digest = hashlib.sha256(b"never written").hexdigest()
    with pytest.raises(CheckpointCorrupted, match="missing"):
        store.read_blob(digest)


def test_a_step_is_committed_once(store: CheckpointStore) -> None:
    digest = blob_digest(b"1")
    store.write_blob(b"1", digest)
    store.commit(_manifest("s", 1, digest, "first"))
    with pytest.raises(CommitConflict):
        store.commit(_manifest("s", 1, digest, "second"))
    assert store.head("s") == 1
    assert store.manifest("s").result == {"attempt": "first"}
    assert store.sessions() == ["s"]


def test_of_racing_commits_exactly_one_wins(store: CheckpointStore) -> None:
    digest = blob_digest(b"1")
    store.write_blob(b"1", digest)
    outcomes: dict[int, str] = {}
    start = threading.Barrier(16)

    def commit(number: int) -> None:
        start.wait()
        try:
            store.commit(_manifest("race", 1, digest, str(number)))
            outcomes[number] = "ok"
        except CommitConflict:
            outcomes[number] = "conflict"

    threads = [threading.Thread(target=commit, args=(n,)) for n in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    winners = [n for n, outcome in outcomes.items() if outcome == "ok"]
    assert len(outcomes) == 16 and len(winners) == 1
    assert store.manifest("race").result == {"attempt": str(winners[0])}


def test_a_signed_manifest_is_verified_with_the_sessions_key(
    store_location: tuple[str, dict[str, str]],
) -> None:
    url, options = store_location
    signer = CheckpointStore(url, options=options, signing_key=b"master")
    digest = blob_digest(b"1")
    signer.write_blob(b"1", digest)
    signer.commit(_manifest("a", 1, digest))
    signer.commit(_manifest("b", 1, digest))

    own = SessionKey("a", session_key(b"master", "a"))
    holder = CheckpointStore(url, options=options, session_key=own)
    assert holder.manifest("a").step == 1
    with pytest.raises(CheckpointCorrupted, match="session 'a' only"):
        holder.manifest("b")
    with pytest.raises(StoreError, match="session 'a' only"):
        holder.commit(_manifest("b", 2, digest))
    holder.commit(_manifest("a", 2, digest))
    assert signer.manifest("a", 2).step == 2

    stranger = CheckpointStore(url, options=options, signing_key=b"another")
    with pytest.raises(CheckpointCorrupted, match="signature does not match"):
        stranger.manifest("a")
    unsigned = CheckpointStore(url, options=options)
    assert unsigned.manifest("a").step == 2  # digests are still checked


def test_records_and_requests_round_trip(store: CheckpointStore) -> None:
    store.write_request("s", "20260101t000000000-00000000", {"code": "x = 1"})
    assert store.read_request("s", "20260101t000000000-00000000") == {"code": "x = 1"}
    assert store.exists("s") is False  # a request alone is not an attempt
