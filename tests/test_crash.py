"""A step's process SIGKILLed at any point leaves the last committed state.

The kills come from tests/faults/sitecustomize.py, on the PYTHONPATH of the
step processes only: it wraps the checkpoint store's methods as the runtime
imports them and kills the process at the point named by a variable of the
step's own environment (see that file). Production code has no hook for this.

Every run kills one step at one point, then checks that the session holds
exactly what its last committed step left (the head, the manifest's variables
and a value that encodes the number of committed steps) and that the next step
works. Runs go through the local backend in both modes, the Kubernetes backend
(the test API server runs pods as local processes) and an S3 store.
"""

# ruff: noqa: F811 - pytest fixtures imported from s3server are test parameters
from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from kubeserver import KubeServer
from s3server import S3Store, s3_server, s3_store  # noqa: F401 (fixtures)

from jobrunner import Session
from jobrunner.backends.base import Backend
from jobrunner.backends.kubernetes import KubernetesBackend
from jobrunner.backends.local import LocalBackend
from jobrunner.result import StepResult

pytestmark = pytest.mark.timeout(240)

FAULTS = Path(__file__).parent / "faults"
KILL_VARIABLE = "JOBRUNNER_TEST_KILL"
NAMES = {"history", "squares", "stamp"}

START = "history = []\nsquares = {}\nstamp = 'step-0'"
# Reads two variables (two blob reads), writes three new blobs, and returns a
# value from which the number of committed increments can be read back.
MUTATE = "history.append(len(history))\nsquares[history[-1]] = history[-1] ** 2\n"
RENAME = "stamp = f'step-{len(history)}'\n"
REPORT = "len(history), history == list(range(len(history))), len(squares), stamp"
STEP = MUTATE + RENAME + REPORT
KILL = "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n"


@dataclass(frozen=True)
class KillPoint:
    """Where a step dies, and whether its commit had happened by then."""

    name: str
    environment: str = ""  # the kill point for the faults module, if any
    code: str = STEP
    committed: bool = False


KILL_POINTS = [
    KillPoint("load: 1st blob read", "load:1"),
    KillPoint("load: 2nd blob read", "load:2"),
    KillPoint("execute: first line", code=KILL + STEP),
    KillPoint("execute: after in-place changes", code=MUTATE + KILL + RENAME),
    KillPoint("execute: after output", code=STEP.replace(REPORT, "print(1)\n" + KILL)),
    KillPoint("save: after 1st of 3 blob writes", "blob:1"),
    KillPoint("save: after 2nd of 3 blob writes", "blob:2"),
    KillPoint("commit: before the manifest create", "commit:1"),
    KillPoint("commit: after the manifest, before HEAD", "head:1", committed=True),
    KillPoint("commit: after HEAD, before the record", "record:1", committed=True),
]


def expected_value(increments: int) -> str:
    return f"({increments}, True, {increments}, 'step-{increments}')"


@dataclass
class Tally:
    """The outcome of one configuration's runs, per kill point."""

    label: str
    runs: Counter[str] = field(default_factory=Counter)
    committed: Counter[str] = field(default_factory=Counter)
    violations: list[str] = field(default_factory=list)


@dataclass
class CrashReport:
    tallies: list[Tally] = field(default_factory=list)

    def render(self) -> str:
        lines = ["", "crash report: SIGKILL at each point, then check and step on"]
        header = f"  {'kill point':<42}" + "".join(
            f"{t.label:>12}" for t in self.tallies
        )
        lines.append(header)
        for point in KILL_POINTS:
            cells = "".join(f"{t.runs[point.name]:>12}" for t in self.tallies)
            lines.append(f"  {point.name:<42}{cells}")
        runs = sum(sum(t.runs.values()) for t in self.tallies)
        committed = sum(sum(t.committed.values()) for t in self.tallies)
        violations = [v for t in self.tallies for v in t.violations]
        lines.append(
            f"  runs {runs}, kill points {len(KILL_POINTS)}, configurations"
            f" {len(self.tallies)}, steps recovered as committed after the kill"
            f" {committed}, violations {len(violations)}"
        )
        lines += [f"  VIOLATION {violation}" for violation in violations]
        return "\n".join(lines)


@pytest.fixture(scope="module")
def report() -> Iterator[CrashReport]:
    collected = CrashReport()
    yield collected
    print(collected.render())
    labels = {tally.label for tally in collected.tallies}
    if labels == {"local-spawn", "local-warm", "kubernetes", "s3-warm"}:
        assert sum(sum(t.runs.values()) for t in collected.tallies) >= 200


@pytest.fixture(autouse=True)
def faults_on_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """Step processes (spawned, the warm parent, pods) import the faults module."""
    inherited = os.environ.get("PYTHONPATH")
    path = os.pathsep.join([str(FAULTS), *([inherited] if inherited else [])])
    monkeypatch.setenv("PYTHONPATH", path)


class KillSwitch:
    """Gives the next steps a kill point through their own environment.

    The variable travels as the backend's per-step environment, as a step's
    secrets do: the warm parent's children and the Kubernetes pods get it with
    their request, long after the faults module was imported.
    """

    def __init__(self, backend: Backend, monkeypatch: pytest.MonkeyPatch) -> None:
        self.point = ""
        environment = backend.environment

        def with_kill_point(session: str) -> dict[str, str]:
            extra = {KILL_VARIABLE: self.point} if self.point else {}
            return {**environment(session), **extra}

        monkeypatch.setattr(backend, "environment", with_kill_point)


def _state_problems(
    session: Session, increments: int, before: dict[str, object] | None
) -> list[str]:
    """What differs from a session holding exactly ``increments`` steps."""
    problems = []
    if session.head != 1 + increments:
        problems.append(f"head is {session.head}, expected {1 + increments}")
    # Listings are never cached: a head read from a stale cache shows here.
    listed = session.store.files.list(f"sessions/{session.id}/steps")
    if len(listed) != session.head:
        problems.append(f"{len(listed)} manifests listed, head is {session.head}")
    manifest = session.store.manifest(session.id)
    if set(manifest.variables) != NAMES:
        problems.append(f"the manifest holds {sorted(manifest.variables)}")
    if before is not None and manifest.to_data() != before:
        problems.append("the manifest changed though the step did not commit")
    return problems


def _result_problems(point: KillPoint, result: StepResult, head: int) -> list[str]:
    if point.committed:
        if (result.status, result.step) != ("ok", head + 1):
            return [f"the result is {result.status} step {result.step}, not ok"]
        return []
    problems = []
    if result.status not in ("killed", "error") or result.step is not None:
        problems.append(f"the result is {result.status} step {result.step}")
    message = result.error.message if result.error else ""
    if "SIGKILL" not in message and "code 137" not in message:
        problems.append(f"the step was not killed: {message!r}")
    return problems


def run_kills(session: Session, switch: KillSwitch, rounds: int, tally: Tally) -> None:
    """Kill one step at every point, ``rounds`` times over; record violations."""
    assert session.run(START).status == "ok"
    increments = 0
    for round_ in range(rounds):
        for point in KILL_POINTS:
            head = session.head
            before = session.store.manifest(session.id).to_data()
            switch.point = point.environment
            try:
                result = session.run(point.code)
            finally:
                switch.point = ""
            tally.runs[point.name] += 1
            problems = _result_problems(point, result, head)
            if point.committed and result.status == "ok":
                increments += 1
                tally.committed[point.name] += 1
            unchanged = None if point.committed else before
            problems += _state_problems(session, increments, unchanged)
            recorded = session.history(last=1)
            if [r.attempt for r in recorded] != [result.attempt]:
                problems.append("the attempt is not the last one in the history")
            after = session.run(STEP)
            if after.status != "ok" or after.value != expected_value(increments + 1):
                problems.append(
                    f"the next step gave {after.status} {after.value!r}"
                    f" {after.error}, expected {expected_value(increments + 1)}"
                )
            # Carry on from what the session holds, so that one violation is
            # reported once and not again by every later run.
            increments = session.head - 1
            tally.violations += [
                f"{tally.label} round {round_} {point.name}: {problem}"
                for problem in problems
            ]
    # One attempt per run and per check, after the first step: none lost.
    assert len(session.history()) == 1 + 2 * rounds * len(KILL_POINTS)


def _finish(tally: Tally, report: CrashReport) -> None:
    report.tallies.append(tally)
    print(CrashReport([tally]).render())
    assert tally.violations == []


@pytest.mark.parametrize(
    ("mode", "rounds"), [("spawn", 8), ("warm", 9)], ids=["spawn", "warm"]
)
def test_local_steps_killed_anywhere_keep_the_last_commit(
    mode: str,
    rounds: int,
    tmp_path: Path,
    report: CrashReport,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    backend = LocalBackend(warm=mode == "warm")
    try:
        session = Session("crash", store=str(tmp_path / "store"), backend=backend)
        switch = KillSwitch(backend, monkeypatch)
        tally = Tally(f"local-{mode}")
        run_kills(session, switch, rounds, tally)
        if backend._parent is not None:
            # The kills hit the forked children only: one parent served all.
            assert backend._parent.process is not None
            assert backend._parent.process.poll() is None
    finally:
        backend.close()
    _finish(tally, report)


def test_kubernetes_steps_killed_anywhere_keep_the_last_commit(
    tmp_path: Path, report: CrashReport, monkeypatch: pytest.MonkeyPatch
) -> None:
    with KubeServer() as server:
        config = server.write_kubeconfig(tmp_path / "kubeconfig", context="test")
        backend = KubernetesBackend(
            kubeconfig=str(config), context="test", image="jobrunner-step:test"
        )
        session = Session("crash", store=str(tmp_path / "store"), backend=backend)
        tally = Tally("kubernetes")
        run_kills(session, KillSwitch(backend, monkeypatch), 3, tally)
        assert server.pod_processes == 0
    _finish(tally, report)


def test_s3_steps_killed_anywhere_keep_the_last_commit(
    s3_store: S3Store,
    report: CrashReport,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # One round only: a step on S3 costs ten of a local one. The warm mode
    # forks each step's process as the other does, without the interpreter's
    # start.
    backend = LocalBackend(warm=True)
    try:
        session = Session(
            "crash",
            store=s3_store.url,
            store_options=s3_store.options,
            backend=backend,
        )
        tally = Tally("s3-warm")
        run_kills(session, KillSwitch(backend, monkeypatch), 1, tally)
    finally:
        backend.close()
    _finish(tally, report)
