"""Step results, transactions, dropped values, timeouts and concurrency."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import pytest

from jobrunner import CheckpointStore, Session
from jobrunner.backends.local import LocalBackend


@pytest.fixture
def session(new_session: Callable[..., Session]) -> Session:
    return new_session("steps")


def test_result_of_a_successful_step(session: Session) -> None:
    result = session.run(
        "x = 41\nprint('hi')\nimport sys\nsys.stderr.write('e')\nx + 1"
    )

    assert (result.status, result.value, result.step) == ("ok", "42", 1)
    assert (result.stdout, result.stderr) == ("hi\n", "e")
    assert result.created == ("sys", "x")
    assert result.error is None
    assert result.timings.load >= 0 and result.timings.execute >= 0
    assert result.timings.save > 0
    assert result.attempt and result.started.endswith("Z")


def test_changed_and_deleted_names(session: Session) -> None:
    session.run("a = 1\nb = 2\nc = 3")
    result = session.run("a = 10\ndel b\nd = 4\nc = 3")
    assert (result.created, result.changed, result.deleted) == (("d",), ("a",), ("b",))


def test_error_traceback_points_at_user_code(session: Session) -> None:
    session.run("def inner():\n    return 1 / 0")
    result = session.run("x = 5\ninner()")

    assert result.status == "error" and result.step is None
    assert result.error is not None
    assert (result.error.type, result.error.message) == (
        "ZeroDivisionError",
        "division by zero",
    )
    traceback = result.error.traceback
    assert 'File "<step 2>", line 2' in traceback
    assert "jobrunner" not in traceback
    assert traceback.rstrip().endswith("ZeroDivisionError: division by zero")


@pytest.mark.parametrize(
    "code",
    [
        "x = 99\nraise ValueError('no')",
        "x = 99\nimport sys\nsys.exit(0)",
        "x = 99\n)",
        "x = 99\nraise KeyboardInterrupt",
    ],
    ids=["raise", "sys.exit", "syntax", "interrupt"],
)
def test_a_failed_step_changes_nothing(session: Session, code: str) -> None:
    session.run("x = 1\nitems = [1]")
    result = session.run(code.replace("x = 99", "x = 99\nitems.append(2)"))

    assert result.status == "error"
    assert session.head == 1
    assert session.run("x, items").value == "(1, [1])"
    assert [r.status for r in session.history()] == ["ok", "error", "ok"]


def test_syntax_error_is_reported_like_python(session: Session) -> None:
    result = session.run("def f(:\n    pass")
    assert result.error is not None and result.error.type == "SyntaxError"
    assert "<step 1>" in result.error.traceback


def test_unserializable_values_are_dropped_with_a_reason(
    session: Session, tmp_path: object
) -> None:
    path = f"{tmp_path}/kept.txt"
    result = session.run(
        f"import threading\nf = open({path!r}, 'w')\nf.write('data')\nf.flush()\n"
        "gen = (i for i in range(3))\nlock = threading.Lock()\nkept = 1"
    )

    assert result.status == "ok"
    assert set(result.dropped) == {"f", "gen", "lock"}
    assert "TextIOWrapper" in result.dropped["f"]
    assert "generator" in result.dropped["gen"]
    assert result.created == ("kept", "threading")
    after = session.run("kept, 'f' in globals()")
    assert after.value == "(1, False)"
    with open(path) as file:  # never re-created or truncated by a load
        assert file.read() == "data"


def test_functions_using_an_unserializable_global_are_kept(session: Session) -> None:
    result = session.run("gen = (i for i in range(3))\ndef f(): return 7")
    assert set(result.dropped) == {"gen"}
    assert session.run("f()").value == "7"


def test_unchanged_variable_costs_no_blob_write(session: Session) -> None:
    session.run("big = list(range(100000))\nsmall = 1")
    result = session.run("small = 2")
    assert 0 < result.bytes_written < 200
    again = session.run("big.append(1)")
    assert again.bytes_written > 100_000


def test_manifest_records_versions_and_blobs(session: Session) -> None:
    import sys

    session.run("x = [1, 2]\ndef f(): return x")
    manifest = session.store.manifest("steps")
    assert manifest.python == sys.version.split()[0]
    assert manifest.dill is not None
    digests = {entry["blob"] for entry in manifest.variables.values()}
    assert digests == set(manifest.blobs)
    assert {info["pickler"] for info in manifest.blobs.values()} == {"pickle", "dill"}


def test_timeout_stops_the_step(session: Session) -> None:
    session.run("x = 1")
    started = time.monotonic()
    result = session.run("x = 2\nimport time\ntime.sleep(60)", timeout=1)

    assert time.monotonic() - started < 30
    assert result.status == "timeout"
    assert session.head == 1
    assert session.history()[-1].status == "timeout"
    assert session.run("x").value == "1"


def test_input_gets_a_clear_error(session: Session) -> None:
    result = session.run("input('name? ')")
    assert result.error is not None
    assert result.error.type == "StdinNotImplementedError"
    assert "does not support input" in result.error.message


def test_output_is_capped_with_a_marker(session: Session) -> None:
    result = session.run("print('x' * 5000)", output_limit=1000)
    assert len(result.stdout) < 1200
    assert "characters of output were cut" in result.stdout


def test_concurrent_steps_commit_or_conflict(
    new_session: Callable[..., Session],
) -> None:
    new_session("race").run("seen = []")

    def step(index: int) -> str:
        return new_session("race").run(f"seen.append({index})").status

    with ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(step, range(8)))

    session = new_session("race")
    committed = statuses.count("ok")
    assert session.head == committed + 1
    seen = eval(session.run("seen").value or "None")
    assert set(statuses) <= {"ok", "conflict"}
    assert committed >= 1
    assert len(seen) == committed == len(set(seen))


def test_retry_on_conflict_applies_every_update(
    new_session: Callable[..., Session],
) -> None:
    new_session("counter").run("n = 0")

    def step(_: int) -> str:
        return new_session("counter").run("n += 1", retry_on_conflict=20).status

    with ThreadPoolExecutor(4) as pool:
        statuses = list(pool.map(step, range(6)))

    assert statuses == ["ok"] * 6
    assert new_session("counter").run("n").value == "6"


def test_killed_at_any_moment_leaves_the_last_commit(
    store_url: str, backend: LocalBackend
) -> None:
    session = Session("killed", store=store_url, backend=backend)
    session.run("data = list(range(300000))\ncount = 0")
    step = "data = data + [count]\ncount += 1"
    started = time.monotonic()
    assert session.run(step).status == "ok"
    duration = time.monotonic() - started
    rng = random.Random(7)
    committed, killed = 1, 0
    for _ in range(12):
        # Kill anywhere from process start to just after a normal step's end:
        # while loading, executing, writing blobs or committing.
        timer = threading.Timer(rng.uniform(0, duration * 1.2), backend.cancel)
        timer.start()
        result = session.run(step)
        timer.cancel()
        assert result.status in ("ok", "killed"), result.error
        committed += result.status == "ok"
        killed += result.status == "killed"
        check = session.run("count, len(data) - 300000")
        assert check.value == f"({committed}, {committed})"
    assert killed >= 2, "the kills should land inside steps"
    statuses = {result.status for result in session.history()}
    assert statuses == {"ok", "killed"}
    assert CheckpointStore(store_url).head("killed") == session.head
