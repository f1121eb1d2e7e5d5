"""Load: many sessions at once stay correct and cost the control process no
memory that grows with the work; one long session stays as fast as a new one.

Steps run on the warm local backend, the cheapest real step processes, so that
thousands of them fit in a test run; what is measured is the control side and
the store, which are the same for every backend.
"""

from __future__ import annotations

import gc
import statistics
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from jobrunner import Session
from jobrunner.backends.local import LocalBackend

pytestmark = pytest.mark.timeout(300)

SESSIONS = 50
STEPS = 40
IN_FLIGHT = 4
LONG_SESSION = 1000
# Generous bounds: these machines are shared and noisy.
MEMORY_GROWTH = 8 * 2**20
SLOWDOWN = 2.0


@pytest.fixture
def warm() -> Iterator[LocalBackend]:
    backend = LocalBackend(warm=True)
    yield backend
    backend.close()


def resident_bytes() -> int:
    """This process's resident memory, after collecting what can be collected."""
    gc.collect()
    with open("/proc/self/statm") as statm:
        pages = int(statm.read().split()[1])
    import resource

    return pages * resource.getpagesize()


def run_counter(session: Session, steps: int) -> list[str]:
    """Count to ``steps``, one step each; return what went wrong."""
    problems = []
    for number in range(1, steps + 1):
        result = session.run("n = 1\nn" if number == 1 else "n += 1\nn")
        if (result.status, result.value, result.step) != ("ok", str(number), number):
            problems.append(f"{session.id} step {number}: {result.status} {result}")
            break
    history = session.history()
    if [r.status for r in history] != ["ok"] * steps:
        problems.append(f"{session.id}: history {[r.status for r in history]}")
    if session.head != steps:
        problems.append(f"{session.id}: head {session.head}")
    return problems


def test_50_sessions_4_in_flight_are_correct_in_flat_memory(
    warm: LocalBackend, tmp_path: Path
) -> None:
    store = str(tmp_path / "store")
    done: list[str] = []
    memory: dict[str, int] = {}
    lock = threading.Lock()

    def work(index: int) -> list[str]:
        session = Session(f"load-{index}", store=store, backend=warm)
        problems = run_counter(session, STEPS)
        with lock:
            done.append(session.id)
            if len(done) == SESSIONS // 4:
                memory["25%"] = resident_bytes()
        return problems

    started = time.monotonic()
    with ThreadPoolExecutor(IN_FLIGHT) as pool:
        problems = [p for found in pool.map(work, range(SESSIONS)) for p in found]
    elapsed = time.monotonic() - started
    memory["100%"] = resident_bytes()

    growth = memory["100%"] - memory["25%"]
    print(
        f"\nload: {SESSIONS} sessions x {STEPS} steps, {IN_FLIGHT} in flight:"
        f" {elapsed:.1f}s ({SESSIONS * STEPS / elapsed:.0f} steps/s);"
        f" control RSS {memory['25%'] / 2**20:.1f} MiB at 25%,"
        f" {memory['100%'] / 2**20:.1f} MiB at 100% ({growth / 2**20:+.1f} MiB)"
    )
    assert problems == []
    assert sorted(done) == sorted(f"load-{index}" for index in range(SESSIONS))
    assert growth < MEMORY_GROWTH


def _timed(action: Callable[[], object], times: int = 7) -> float:
    """The median duration of ``action``, in seconds."""
    durations = []
    for _ in range(times):
        started = time.perf_counter()
        action()
        durations.append(time.perf_counter() - started)
    return statistics.median(durations)


class CountingFiles:
    """A store's file access that counts the operations asked of it."""

    def __init__(self, files: Any) -> None:
        self.files = files
        self.calls: Counter[str] = Counter()

    def __getattr__(self, name: str) -> Any:
        found = getattr(self.files, name)
        if not callable(found):
            return found

        def counted(*arguments: Any) -> Any:
            self.calls[name] += 1
            return found(*arguments)

        return counted


@dataclass
class Costs:
    """What reading a session's recent history costs at one point of its life."""

    history: float  # seconds for history(last=20)
    listing: float  # seconds for one listing of the attempts
    variables: float  # seconds for variables()
    operations: Counter[str]  # store operations made by history(last=20)


def _costs(session: Session, monkeypatch: pytest.MonkeyPatch) -> Costs:
    files = session.store.files
    counting = CountingFiles(files)
    with monkeypatch.context() as patch:
        patch.setattr(session.store, "files", counting)
        session.history(last=20)
    listing = _timed(lambda: files.list(f"sessions/{session.id}/attempts"))
    return Costs(
        history=_timed(lambda: session.history(last=20)),
        listing=listing,
        variables=_timed(session.variables),
        operations=counting.calls,
    )


def test_a_1000_step_session_stays_as_fast_as_a_new_one(
    warm: LocalBackend, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    session = Session("long", store=str(tmp_path / "store"), backend=warm)
    latencies: list[float] = []
    costs: dict[int, Costs] = {}
    session.run("n = 0\nlog = []")
    for number in range(2, LONG_SESSION + 1):
        started = time.perf_counter()
        result = session.run("n += 1\nlog.append(n)\nn")
        latencies.append(time.perf_counter() - started)
        assert (result.status, result.step) == ("ok", number), result.error
        if number in (50, LONG_SESSION):
            costs[number] = _costs(session, monkeypatch)

    early = statistics.median(latencies[8:29])  # steps 10 to 30
    late = statistics.median(latencies[-21:])  # steps 980 to 1000
    young, old = costs[50], costs[LONG_SESSION]
    print(
        f"\n1000-step session: step latency median {early * 1000:.1f} ms at"
        f" steps 10-30, {late * 1000:.1f} ms at 980-1000\n"
        f"  history(last=20): {young.history * 1000:.2f} ms at step 50,"
        f" {old.history * 1000:.2f} ms at step 1000, of which listing the"
        f" attempts {young.listing * 1000:.2f} / {old.listing * 1000:.2f} ms;"
        f" store operations {dict(young.operations)} / {dict(old.operations)}\n"
        f"  variables(): {young.variables * 1000:.2f} ms at step 50,"
        f" {old.variables * 1000:.2f} ms at step 1000"
    )
    assert [r.step for r in session.history(last=20)] == list(range(981, 1001))
    value = session.run("n, len(log)").value
    assert value == f"({LONG_SESSION - 1}, {LONG_SESSION - 1})"
    assert late < SLOWDOWN * early
    # As many store operations at step 1000 as at step 50...
    assert old.operations == young.operations
    assert old.variables < SLOWDOWN * young.variables
    # ...but one of them lists every attempt the session ever made: the one
    # cost that grows with the session (a name per attempt; on S3, a request
    # per 1,000). Everything else in history(last=20) stays flat.
    assert old.history - old.listing < SLOWDOWN * young.history
