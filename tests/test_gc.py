"""Garbage collection and session deletion: what goes, what must stay."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from s3server import S3Server, s3_server  # noqa: F401 (a fixture)
from steps import run_all
from typer.testing import CliRunner

from jobrunner import CheckpointStore, Session
from jobrunner.backends.local import LocalBackend
from jobrunner.cli import app
from jobrunner.errors import CheckpointCorrupted, InvalidInput, UnknownSession
from jobrunner.session import delete_session, gc
from jobrunner.store import Manifest, blob_digest, new_attempt_id

HOUR = 3600.0


@pytest.fixture
def warm() -> Iterator[LocalBackend]:
    backend = LocalBackend(warm=True)
    yield backend
    backend.close()


@pytest.fixture
def make(store_url: str, warm: LocalBackend) -> Callable[[str], Session]:
    return lambda name: Session(name, store=store_url, backend=warm)


def _blobs(store_url: str) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in (Path(store_url) / "blobs").glob("*/*")}


def _orphan(store: CheckpointStore, text: bytes, age: float = 0.0) -> str:
    """Write a blob no manifest lists, as a step does before it commits."""
    digest = blob_digest(text)
    store.write_blob(text, digest)
    if age:
        path = Path(store.url) / "blobs" / digest[:2] / digest
        os.utime(path, (time.time() - age, time.time() - age))
    return digest


# Removing old steps.


def test_keep_last_removes_old_steps_their_attempts_and_their_blobs(
    make: Callable[[str], Session], store_url: str
) -> None:
    session = make("old")
    run_all(session, "a = bytes(5000)", "a = bytes(6000)\nb = [1]")
    session.run("1/0")
    run_all(session, "b.append(2)", "c = 3")
    blobs = _blobs(store_url)

    report = gc(store_url, keep_last=2, grace=0)

    assert report.steps_removed == {"old": [1, 2]}
    assert report.attempts_removed == 3  # two committed, one failed on step 2
    gone = set(blobs) - set(_blobs(store_url))
    assert report.blobs_removed == len(gone) == 2  # bytes(5000) and the old b
    assert report.bytes_freed == sum(blobs[digest] for digest in gone)
    assert [r.step for r in session.history()] == [3, 4]
    assert sorted(os.listdir(Path(store_url) / "sessions/old/requests")) == sorted(
        f"{r.attempt}.json" for r in session.history()
    )
    assert run_all(session, "len(a), b, c") == "(6000, [1, 2], 3)"


def test_the_last_step_always_stays(make: Callable[[str], Session]) -> None:
    session = make("last")
    run_all(session, "x = 1", "x = 2")
    report = gc(session.store, older_than=0, grace=0)
    assert report.steps_removed == {"last": [1]}
    assert session.head == 2 and run_all(session, "x") == "2"  # commits step 3
    assert gc(session.store, keep_last=1).steps_removed == {"last": [2]}
    assert gc(session.store, keep_last=1, older_than=0).steps_removed == {}
    assert session.head == 3 and run_all(session, "x") == "2"
    with pytest.raises(InvalidInput, match="keep_last"):
        gc(session.store, keep_last=0)
    with pytest.raises(InvalidInput, match="grace"):
        gc(session.store, grace=-1)


def test_older_than_keeps_recent_steps(make: Callable[[str], Session]) -> None:
    session = make("recent")
    run_all(session, "x = 1", "x = 2", "x = 3")
    assert gc(session.store, older_than=HOUR, grace=0).steps_removed == {}
    assert gc(session.store, keep_last=2, older_than=HOUR).steps_removed == {}
    assert gc(session.store, keep_last=2, older_than=0).steps_removed == {"recent": [1]}


def test_a_dry_run_reports_and_removes_nothing(
    make: Callable[[str], Session], store_url: str
) -> None:
    session = make("dry")
    run_all(session, "x = bytes(1000)", "x = 2")
    files = sorted(str(p) for p in Path(store_url).rglob("*"))

    dry = gc(store_url, keep_last=1, grace=0, dry_run=True)

    assert sorted(str(p) for p in Path(store_url).rglob("*")) == files
    real = gc(store_url, keep_last=1, grace=0)
    assert (dry.dry_run, real.dry_run) == (True, False)
    assert dry.to_dict() | {"dry_run": False} == real.to_dict()
    assert real.blobs_removed == 1 and real.bytes_freed > 1000


def test_a_rollback_keeps_the_blobs_of_the_step_it_restored(
    make: Callable[[str], Session],
) -> None:
    session = make("back")
    run_all(session, "x = bytes(3000)", "x = 1")
    session.rollback(1)
    report = gc(session.store, keep_last=1, grace=0)
    assert report.steps_removed == {"back": [1, 2]}
    assert report.blobs_removed == 1  # x = 1 only
    assert run_all(session, "len(x)") == "3000"


# The grace period: a step writes its blobs before its manifest.


def test_unreferenced_blobs_stay_during_the_grace_period(
    make: Callable[[str], Session], store_url: str
) -> None:
    run_all(make("graced"), "x = 1")
    fresh = _orphan(CheckpointStore(store_url), b"just written")
    old = _orphan(CheckpointStore(store_url), b"left by a crash", age=2 * HOUR)

    report = gc(store_url)

    assert (report.blobs_removed, report.blobs_in_grace) == (1, 1)
    assert report.bytes_freed == len(b"left by a crash")
    assert fresh in _blobs(store_url) and old not in _blobs(store_url)
    assert gc(store_url, grace=1).blobs_in_grace == 1
    time.sleep(1.1)
    assert gc(store_url, grace=1).blobs_removed == 1
    assert fresh not in _blobs(store_url)


# A step whose commit waits: the runtime has written its blobs, the manifest
# that lists them is not there yet.
_DELAYED_STEP = """
import pathlib, sys, time
from jobrunner.runtime._step import run_step
from jobrunner.store import CheckpointStore

url, session, attempt, ready, go = sys.argv[1:]
store = CheckpointStore(url)
commit = store.commit

def commit_later(manifest):
    pathlib.Path(ready).touch()
    while not pathlib.Path(go).exists():
        time.sleep(0.01)
    commit(manifest)

store.commit = commit_later
print(run_step(store, session, attempt).status)
"""


def _step_paused_before_commit(
    store: CheckpointStore, session: str, code: str, folder: Path
) -> tuple[subprocess.Popen[str], Path]:
    attempt = new_attempt_id()
    store.write_request(session, attempt, {"code": code})
    ready, go = folder / f"ready-{attempt}", folder / f"go-{attempt}"
    arguments = [store.url, session, attempt, str(ready), str(go)]
    process = subprocess.Popen(
        [sys.executable, "-c", _DELAYED_STEP, *arguments],
        stdout=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 30
    while not ready.exists():
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)
    return process, go


def _finish(process: subprocess.Popen[str], go: Path) -> str:
    go.touch()
    output, _ = process.communicate(timeout=30)
    return output.strip()


def test_gc_during_a_step_keeps_the_blobs_it_is_about_to_commit(
    make: Callable[[str], Session], store_url: str, tmp_path: Path
) -> None:
    session = make("running")
    run_all(session, "x = 1")
    store = CheckpointStore(store_url)
    process, go = _step_paused_before_commit(
        store, "running", "fresh = bytes(range(256)) * 1000", tmp_path
    )

    report = gc(store_url, keep_last=1, older_than=0)

    assert (report.blobs_removed, report.blobs_in_grace) == (0, 1)
    assert _finish(process, go) == "ok"
    assert run_all(session, "len(fresh), x") == "(256000, 1)"


def test_without_the_grace_period_that_step_would_lose_its_blob(
    make: Callable[[str], Session], store_url: str, tmp_path: Path
) -> None:
    session = make("unsafe")
    run_all(session, "x = 1")
    store = CheckpointStore(store_url)
    process, go = _step_paused_before_commit(
        store, "unsafe", "fresh = bytes(range(256)) * 1000", tmp_path
    )

    assert gc(store_url, grace=0).blobs_removed == 1
    assert _finish(process, go) == "ok"
    result = session.run("fresh")
    assert result.error is not None and result.error.type == "CheckpointCorrupted"


# Forks, deletion and every session's blobs.


def test_blobs_shared_with_a_fork_live_as_long_as_one_session_lists_them(
    make: Callable[[str], Session], store_url: str
) -> None:
    source = make("source")
    run_all(source, "shared = bytes(10_000)\nmine = [1]")
    fork = source.fork("forked")
    run_all(source, "mine = [2]")
    run_all(fork, "mine = [3]")
    before = _blobs(store_url)

    report = delete_session("source", store_url, grace=0)

    assert report.sessions_deleted == ["source"]
    assert report.steps_removed == {"source": [1, 2]}
    assert report.blobs_removed == 1  # mine = [2]; step 1's blobs the fork lists
    assert not (Path(store_url) / "sessions/source").exists()
    assert CheckpointStore(store_url).sessions() == ["forked"]
    assert run_all(fork, "len(shared), mine") == "(10000, [3])"
    assert gc(store_url, keep_last=1, grace=0).blobs_removed == 1  # mine = [1]
    assert run_all(fork, "len(shared)") == "10000"

    remaining = _blobs(store_url)
    assert set(remaining) < set(before)
    last = delete_session("forked", store_url, grace=0)
    assert (last.blobs_removed, last.bytes_freed) == (
        len(remaining),
        sum(remaining.values()),
    )
    assert _blobs(store_url) == {}
    with pytest.raises(UnknownSession):
        delete_session("forked", store_url)


def test_deleting_keeps_recent_blobs_for_a_later_collection(
    make: Callable[[str], Session], store_url: str
) -> None:
    run_all(make("gone"), "x = bytes(2000)")
    report = delete_session("gone", store_url)
    assert (report.blobs_removed, report.blobs_in_grace) == (0, 1)
    assert gc(store_url, grace=0).blobs_removed == 1


def test_an_unreadable_manifest_stops_gc_before_any_blob_goes(
    make: Callable[[str], Session], store_url: str
) -> None:
    run_all(make("broken"), "x = 1", "x = 2")
    _orphan(CheckpointStore(store_url), b"orphan")
    (Path(store_url) / "sessions/broken/steps/0000000001.json").write_text("{")
    blobs = _blobs(store_url)
    with pytest.raises(CheckpointCorrupted, match=r"0000000001\.json"):
        gc(store_url, grace=0)
    assert _blobs(store_url) == blobs


# Every kind of store.


@pytest.fixture(params=["file", "memory", "s3"])
def any_store(request: pytest.FixtureRequest, tmp_path: Path) -> CheckpointStore:
    if request.param == "file":
        return CheckpointStore(str(tmp_path / "store"))
    if request.param == "memory":
        return CheckpointStore(f"memory://gc-{uuid.uuid4().hex}")
    server: S3Server = request.getfixturevalue("s3_server")
    server.reset_faults()
    return CheckpointStore(
        f"s3://{server.new_bucket()}/store", options={"endpoint_url": server.endpoint}
    )


def _commit(store: CheckpointStore, session: str, step: int, data: bytes) -> str:
    digest = blob_digest(data)
    store.write_blob(data, digest)
    store.commit(
        Manifest(
            session=session,
            step=step,
            variables={"x": {"blob": digest, "type": "bytes", "size": 1, "needs": []}},
            blobs={digest: {"size": len(data), "pickler": "pickle"}},
            result={"attempt": ""},
        )
    )
    return digest


def test_gc_fork_and_delete_on_every_store(any_store: CheckpointStore) -> None:
    first = _commit(any_store, "a", 1, b"first" * 100)
    second = _commit(any_store, "a", 2, b"second")
    any_store.fork("a", "b", step=1)
    any_store.write_blob(b"orphan")

    kept = any_store.gc(keep_last=1)
    assert (kept.steps_removed, kept.blobs_removed) == ({"a": [1]}, 0)
    assert kept.blobs_in_grace == 1  # the orphan, just written

    removed = any_store.gc(grace=0)
    assert (removed.blobs_removed, removed.bytes_freed) == (1, len(b"orphan"))
    deleted = any_store.delete("b", grace=0)
    assert (deleted.blobs_removed, deleted.bytes_freed) == (1, 500)
    assert any_store.sessions() == ["a"]
    assert bytes(any_store.read_blob(second)) == b"second"
    with pytest.raises(CheckpointCorrupted, match="missing"):
        any_store.read_blob(first)


# The command line.


@pytest.fixture
def cli(store_url: str, monkeypatch: pytest.MonkeyPatch) -> Callable[..., Any]:
    monkeypatch.setenv("JOBRUNNER_STORE", store_url)
    runner = CliRunner()
    return lambda *args, stdin=None: runner.invoke(app, list(args), input=stdin)


def test_cli_gc_and_delete(
    make: Callable[[str], Session], cli: Callable[..., Any], store_url: str
) -> None:
    session = make("cli")
    run_all(session, "x = bytes(4000)", "x = 1", "x = 2")

    dry = cli("gc", "--keep-last", "1", "--grace", "0s", "--dry-run")
    assert dry.exit_code == 0, dry.output
    assert "would remove 2 blobs" in dry.stdout and "1-2" in dry.stdout
    report = json.loads(
        cli("gc", "--older-than", "0m", "--grace", "0", "--json").stdout
    )
    assert report["steps_removed"] == {"cli": [1, 2]}
    assert report["blobs_removed"] == 2 and report["bytes_freed"] > 4000
    assert cli("gc", "--keep-last", "0").exit_code == 2
    assert cli("gc", "--older-than", "soon").exit_code == 2

    declined = cli("delete", "cli", stdin="n\n")
    assert declined.exit_code == 1 and session.head == 3
    deleted = cli("delete", "cli", "--yes", "--grace", "0")
    assert deleted.exit_code == 0, deleted.output
    assert "removed its folder" in deleted.stdout
    assert _blobs(store_url) == {}
    assert cli("delete", "cli", "--yes").exit_code == 2


def test_reusing_an_old_unlisted_blob_renews_it_on_every_store(
    any_store: CheckpointStore,
) -> None:
    old = any_store.write_blob(b"reused") and blob_digest(b"reused")
    # S3 keeps whole seconds: the blob is 3 s old when it is reused, and the
    # grace of 2 s would remove it but for the renewal.
    time.sleep(3.0)
    cutoff = int(time.time())
    # A step whose new value has the same bytes as a blob no manifest lists
    # any more writes nothing, but renews the blob, so that a collection in
    # progress keeps it.
    assert any_store.write_blob(b"reused") == 0
    assert any_store._blob_stat(old)[0] >= cutoff
    assert any_store.gc(grace=2.0).blobs_in_grace == 1
