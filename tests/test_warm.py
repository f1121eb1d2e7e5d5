"""The local backend's warm mode: a pre-imported parent forks each step."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from jobrunner import Session
from jobrunner.backends.local import LocalBackend


@pytest.fixture
def warm() -> Iterator[LocalBackend]:
    backend = LocalBackend(warm=True, memory_limit=1024 * 1024 * 1024)
    yield backend
    backend.close()


def _parent_pid(backend: LocalBackend) -> int:
    assert backend._parent is not None and backend._parent.process is not None
    return backend._parent.process.pid


def _processes() -> dict[int, tuple[str, int]]:
    """Return pid -> (state, parent pid) for every process on the machine."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        found[int(entry.name)] = (fields[0], int(fields[1]))
    return found


def test_each_step_is_a_new_process_that_exits(warm: LocalBackend, store_url: str):
    session = Session("pids", store=store_url, backend=warm)
    first = session.run("import os\npid = os.getpid()\nparent = os.getppid()")
    second = session.run("os.getpid() != pid, os.getppid() == parent")

    assert first.status == "ok" and second.value == "(True, True)"
    parent = _parent_pid(warm)
    assert parent != os.getpid()
    children = [pid for pid, (_, ppid) in _processes().items() if ppid == parent]
    assert children == [], "no step process outlives its step"


def test_steps_of_different_sessions_share_nothing(warm: LocalBackend, store_url: str):
    one = Session("one", store=store_url, backend=warm)
    other = Session("other", store=store_url, backend=warm)
    one.run("import json\njson.leaked = 'secret'\nsecret = 42")

    result = other.run("import json\nhasattr(json, 'leaked'), 'secret' in globals()")
    assert result.value == "(False, False)"
    assert one.run("hasattr(json, 'leaked'), secret").value == "(False, 42)"


@pytest.mark.parametrize(
    ("code", "status"),
    [
        ("import os\nos.kill(os.getpid(), 9)", "killed"),
        ("import os\nos._exit(7)", "error"),
        ("hog = bytearray(4 * 1024 ** 3)", "killed"),
        ("import ctypes\nctypes.string_at(0)", "killed"),
    ],
    ids=["sigkill", "exit", "memory", "segfault"],
)
def test_the_parent_survives_a_failing_child(
    warm: LocalBackend, store_url: str, code: str, status: str
) -> None:
    session = Session("crash", store=store_url, backend=warm)
    session.run("x = 1")
    parent = _parent_pid(warm)

    assert session.run(code).status == status
    assert _parent_pid(warm) == parent
    assert session.run("x + 1").value == "2"


def test_a_dead_parent_is_restarted(warm: LocalBackend, store_url: str) -> None:
    session = Session("restart", store=store_url, backend=warm)
    session.run("x = 1")
    parent = _parent_pid(warm)
    os.kill(parent, signal.SIGKILL)

    assert session.run("x + 1").value == "2"
    assert _parent_pid(warm) != parent


def test_no_zombies_or_orphans_are_left(store_url: str) -> None:
    backend = LocalBackend(warm=True)
    session = Session("zombies", store=store_url, backend=backend)
    for code in ("x = 1", "1/0", "import os\nos.kill(os.getpid(), 9)", "x"):
        session.run(code)
    session.run("import time\ntime.sleep(30)", timeout=0.5)
    parent = _parent_pid(backend)
    backend.close()

    processes = _processes()
    assert parent not in processes
    assert [pid for pid, (_, ppid) in processes.items() if ppid == parent] == []
    mine = [pid for pid, (state, ppid) in processes.items() if ppid == os.getpid()]
    assert all(processes[pid][0] != "Z" for pid in mine)
