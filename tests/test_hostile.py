"""Hostile and broken input: nothing crashes jobrunner, nothing committed is lost."""

from __future__ import annotations

import json
import math
import os
import re
import resource
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jobrunner import InvalidInput, InvalidSessionId, Session
from jobrunner.backends.local import LocalBackend

SESSION_ID = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
STATUSES = {"ok", "error", "conflict", "timeout", "killed"}


@pytest.fixture(scope="module")
def warm() -> Iterator[LocalBackend]:
    backend = LocalBackend(warm=True)
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("hostile") / "store")


@given(st.text(max_size=80) | st.from_regex(SESSION_ID, fullmatch=True))
def test_session_ids_are_accepted_exactly_when_they_are_dns_labels(
    session_id: str,
) -> None:
    valid = SESSION_ID.fullmatch(session_id) is not None
    try:
        Session(session_id, store="memory://never-written")
    except InvalidSessionId:
        assert not valid
    else:
        assert valid


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(code=st.text(max_size=200) | st.binary(max_size=200))
def test_any_code_gives_a_result_and_keeps_the_state(
    code: str | bytes, warm: LocalBackend, store: str
) -> None:
    session = Session("fuzz", store=store, backend=warm)
    if session.head == 0:
        session.run("anchor = 'kept'")
    try:
        result = session.run(code, timeout=10)
    except InvalidInput:
        assert isinstance(code, bytes) or "\x00" in code
        return
    assert result.status in STATUSES
    assert session.run("anchor").value == "'kept'"


@settings(max_examples=30, deadline=None)
@given(
    timeout=st.none() | st.floats(allow_nan=True) | st.integers(-5, 0),
    retries=st.integers(-3, 3),
    limit=st.none() | st.integers(-5, 0),
)
def test_bad_options_are_refused_before_any_step(
    timeout: float | None, retries: int, limit: int | None
) -> None:
    good_timeout = timeout is None or (math.isfinite(timeout) and timeout > 0)
    good = good_timeout and retries >= 0 and limit is None
    session = Session("options", store="memory://options")
    if good:
        return
    with pytest.raises(InvalidInput):
        session.run(
            "x = 1", timeout=timeout, retry_on_conflict=retries, output_limit=limit
        )


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def test_a_gigabyte_of_output_is_capped(warm: LocalBackend, store: str) -> None:
    session = Session("loud", store=store, backend=warm)
    before = _peak_rss_mib()
    seen = []
    result = session.run(
        "import sys\nchunk = 'x' * 1_000_000\nfor _ in range(1000):\n"
        "    sys.stdout.write(chunk)\ndone = True",
        output_limit=64 * 1024,
        on_output=lambda _, text: seen.append(len(text)),
    )
    assert result.status == "ok"
    assert len(result.stdout) < 70 * 1024
    assert "999934464 more characters of output were cut" in result.stdout
    assert sum(seen) < 70 * 1024, "live output is capped too"
    assert _peak_rss_mib() - before < 100


def test_unbounded_allocation_is_stopped_for_memory(store: str) -> None:
    backend = LocalBackend(memory_limit=512 * 2**20)
    session = Session("hungry", store=store, backend=backend)
    session.run("x = 1")
    result = session.run(
        "x = 2\nhog = []\nwhile True:\n    hog.append(bytearray(10**7))"
    )
    assert result.status == "killed" and result.error is not None
    assert result.error.type == "OutOfMemory"
    assert "512Mi" in result.error.message
    assert session.run("x").value == "1"


def test_an_infinite_loop_is_stopped_by_the_timeout(warm: LocalBackend, store: str):
    session = Session("loop", store=store, backend=warm)
    started = time.monotonic()
    assert session.run("while True:\n    pass", timeout=1).status == "timeout"
    assert time.monotonic() - started < 15


def test_a_fork_storm_is_stopped_with_its_processes(store: str) -> None:
    # Bounded: a real fork bomb would take down the shared test machine.
    session = Session("forks", store=store)
    marker = f"jobrunner-fork-storm-{os.getpid()}"
    result = session.run(
        "import os, time\n"
        "for _ in range(40):\n"
        "    if os.fork() == 0:\n"
        f"        os.execvp('sleep', ['sleep', '300', '{marker}'])\n"
        "time.sleep(300)",
        timeout=2,
    )
    assert result.status == "timeout"
    time.sleep(0.5)
    left = [
        entry.name
        for entry in Path("/proc").iterdir()
        if entry.name.isdigit() and marker in _command_line(entry)
    ]
    assert left == []


def _command_line(entry: Path) -> str:
    try:
        return (entry / "cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return ""


def test_input_gets_a_clear_error(warm: LocalBackend, store: str) -> None:
    result = Session("stdin", store=store, backend=warm).run("name = input('who? ')")
    assert result.error is not None
    assert result.error.type == "StdinNotImplementedError"
    assert "input requests" in result.error.message


def test_a_step_that_wipes_its_working_directory(store: str, tmp_path: Path) -> None:
    session = Session("wiper", store=store)
    session.run("precious = [1, 2, 3]")
    result = session.run(
        "import os, shutil\n"
        "for name in os.listdir('.'):\n"
        "    shutil.rmtree(name, ignore_errors=True)\n"
        "open('checkpoints', 'w').write('garbage')\n"
        "here = os.getcwd()"
    )
    assert result.status == "ok"
    assert session.run("precious").value == "[1, 2, 3]"
    assert session.run("os.path.exists(here)").value == "False"


def test_a_checkpoint_from_other_versions_warns_then_fails_clearly(
    store: str,
) -> None:
    session = Session("skew", store=store)
    # An instance of a class from a module that exists only in this process:
    # the next process cannot rebuild it.
    session.run(
        "import sys, types\nvanishing = types.ModuleType('vanishing')\n"
        "sys.modules['vanishing'] = vanishing\nclass Thing:\n    pass\n"
        "Thing.__module__ = 'vanishing'\nvanishing.Thing = Thing\n"
        "thing = Thing()\ndel Thing, vanishing\nplain = [1, 2]"
    )
    manifest_path = Path(store, "sessions", "skew", "steps", f"{1:010d}.json")
    data = json.loads(manifest_path.read_text())
    for name in ("thing", "plain"):
        blob = data["blobs"][data["variables"][name]["blob"]]
        blob.update(python="3.99.0", dill="9.9.9", pickler="dill")
    manifest_path.write_text(json.dumps(data))

    warned = session.run("plain")
    assert warned.status == "ok" and warned.value == "[1, 2]"
    assert "written by Python 3.99.0 and dill 9.9.9" in warned.stderr

    failed = session.run("thing")
    assert failed.status == "error" and failed.error is not None
    message = failed.error.message
    assert "could not rebuild 'thing'" in message
    assert "Python 3.99.0 and dill 9.9.9" in message
    assert "No module named 'vanishing'" in message
    assert "Traceback" not in message
