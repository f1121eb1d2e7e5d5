"""Sessions on S3: real step processes against moto's server, with faults.

The server sits behind a proxy (see s3server.py) that the tests stop and start
again on the same port, switch to 503 answers, slow down, or make drop an
answer after the request took effect.
"""

# ruff: noqa: F811 - pytest fixtures imported from s3server are test parameters
from __future__ import annotations

import json
import logging
import threading
from typing import Any

import pytest
from s3server import S3Store, s3_server, s3_store  # noqa: F401 (fixtures)

from jobrunner import Session
from jobrunner.backends.base import StepLaunch
from jobrunner.backends.local import LocalBackend
from jobrunner.errors import StoreUnavailable
from jobrunner.result import StepResult

pytestmark = pytest.mark.timeout(120)


class RecordingBackend(LocalBackend):
    """A local backend that keeps what each step was launched with."""

    def __init__(self) -> None:
        super().__init__()
        self.launches: list[StepLaunch] = []

    def run(self, launch: StepLaunch, on_output: Any) -> Any:
        self.launches.append(launch)
        return super().run(launch, on_output)


def _session(s3: S3Store, name: str = "s3", **options: Any) -> Session:
    return Session(name, store=s3.url, store_options={**s3.options, **options})


def _until_printed(text: str) -> tuple[threading.Event, Any]:
    printed = threading.Event()

    def watch(stream: str, output: str) -> None:
        if text in output:
            printed.set()

    return printed, watch


def test_a_session_keeps_its_state_on_s3(s3_store: S3Store) -> None:
    session = _session(s3_store)
    assert session.run("import numpy as np\nx = np.arange(10**6)").status == "ok"
    result = session.run("x[0] = 7\nint(x.sum()), x.flags.writeable")
    assert result.status == "ok", result.error
    assert result.value == f"({sum(range(10**6)) + 7}, True)"
    assert session.run("int(x[0])").value == "7"
    assert {v.name for v in session.variables()} == {"np", "x"}


def test_of_16_racing_steps_each_is_applied_once_or_conflicts(
    s3_store: S3Store,
) -> None:
    session = _session(s3_store)
    session.run("ids = []")
    results: dict[int, StepResult] = {}
    start = threading.Barrier(16)

    def step(number: int) -> None:
        start.wait()
        results[number] = session.run(f"ids = ids + [{number}]")

    threads = [threading.Thread(target=step, args=(n,)) for n in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    committed = sorted(n for n, r in results.items() if r.status == "ok")
    conflicted = sorted(n for n, r in results.items() if r.status == "conflict")
    assert sorted(committed + conflicted) == list(range(16))
    assert committed, "at least one step commits"
    final = json.loads(session.run("import json\njson.dumps(ids)").value.strip("'"))
    assert sorted(final) == committed  # none lost, none applied twice
    assert session.head == 2 + len(committed)


def test_a_store_restarted_mid_step_loses_nothing(s3_store: S3Store) -> None:
    session = _session(s3_store)
    session.run("x = 1")
    printed, watch = _until_printed("running")
    outcome: dict[str, StepResult] = {}
    code = "import time\nprint('running', flush=True)\ntime.sleep(1.5)\nx = x + 1"
    runner = threading.Thread(
        target=lambda: outcome.setdefault("r", session.run(code, on_output=watch))
    )
    runner.start()
    assert printed.wait(30)
    s3_store.server.stop_proxy()  # connections are refused...
    threading.Event().wait(2.0)  # ...for a while: the fault lasts this long
    s3_store.server.start()  # ...and the same port answers again
    runner.join()
    assert outcome["r"].status == "ok", outcome["r"].error
    assert session.run("x").value == "2"


@pytest.mark.parametrize("fault", ["status", "drop"])
def test_transient_faults_while_committing_are_retried(
    s3_store: S3Store, fault: str
) -> None:
    session = _session(s3_store, "faults")
    session.run("x = 1")
    faults = s3_store.server.faults
    printed, watch = _until_printed("running")
    outcome: dict[str, StepResult] = {}
    code = "print('running', flush=True)\nimport time\ntime.sleep(1)\nx = x + 1"
    runner = threading.Thread(
        target=lambda: outcome.setdefault("r", session.run(code, on_output=watch))
    )
    runner.start()
    assert printed.wait(30)
    if fault == "status":
        faults.status = 503
        threading.Event().wait(1.5)
        faults.status = None
    else:
        # The manifest's PUT takes effect but its answer is lost: the retry
        # meets 412 and must see that the object is its own.
        faults.drop_answer_to = "/sessions/faults/steps/0000000002.json"
    runner.join()
    assert outcome["r"].status == "ok", outcome["r"].error
    assert session.head == 2
    assert session.run("x").value == "2"


def test_slow_answers_time_out_and_are_retried(s3_store: S3Store) -> None:
    session = _session(s3_store, config_kwargs={"read_timeout": 1})
    session.run("x = 1")
    s3_store.server.faults.delay, s3_store.server.faults.delayed = 3.0, 2
    assert session.run("x = x + 1").status == "ok"
    assert session.run("x").value == "2"


def test_a_store_that_stays_down_fails_the_step_and_changes_nothing(
    s3_store: S3Store,
) -> None:
    session = _session(s3_store, "down")
    session.run("x = 1")
    printed, watch = _until_printed("running")
    outcome: dict[str, StepResult] = {}
    code = "print('running', flush=True)\nimport time\ntime.sleep(1)\nx = 99"
    runner = threading.Thread(
        target=lambda: outcome.setdefault("r", session.run(code, on_output=watch))
    )
    runner.start()
    assert printed.wait(30)
    s3_store.server.stop_proxy()
    runner.join(60)
    assert not runner.is_alive(), "a dead store must fail the step in seconds"
    result = outcome["r"]
    assert result.status == "error"
    assert result.error is not None and result.error.type == "StoreUnavailable"
    assert "unreachable" in result.error.message
    s3_store.server.start()
    assert session.head == 1
    assert session.run("x").value == "1"


SECRETS = ("AKIALEAKTESTKEY0001", "leak-test-secret-0001", "leak-test-signing-key")


def test_credentials_never_leak(
    s3_store: S3Store,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("JOBRUNNER_SIGNING_KEY", SECRETS[2])
    backend = RecordingBackend()
    session = Session(
        "leaks",
        store=s3_store.url,
        backend=backend,
        store_options={**s3_store.options, "key": SECRETS[0], "secret": SECRETS[1]},
    )
    ok = session.run("x = 1\nx")
    failed = session.run("raise ValueError('boom')")
    s3_store.server.stop_proxy()
    with pytest.raises(StoreUnavailable) as down:
        session.run("x")
    s3_store.server.start()
    assert ok.status == "ok" and failed.status == "error"

    launch = backend.launches[0]
    environment = launch.environment
    assert json.loads(environment["JOBRUNNER_STORE_OPTIONS"]) == {
        "key": SECRETS[0],
        "secret": SECRETS[1],
    }
    assert environment["JOBRUNNER_SESSION_KEY"].startswith("leaks:")
    assert environment["JOBRUNNER_SIGNING_KEY"] == ""
    ours = [r.getMessage() for r in caplog.records if r.name.startswith("jobrunner")]
    # botocore's own DEBUG lines show the access key id (in the Authorization
    # header, as AWS documents it); never the secret key or a signing key.
    assert SECRETS[1] not in caplog.text and SECRETS[2] not in caplog.text
    exposed = [
        " ".join(launch.arguments),
        repr(launch),
        *ours,
        str(down.value),
        *(json.dumps(r.to_dict()) for r in (ok, failed)),
        *(json.dumps(r.to_dict()) for r in session.history()),
        environment["JOBRUNNER_SESSION_KEY"],
    ]
    for secret in SECRETS:
        for text in exposed:
            assert secret not in text


def test_json_output_of_the_cli_never_shows_credentials(
    s3_store: S3Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from jobrunner.cli import app

    monkeypatch.setenv("JOBRUNNER_SIGNING_KEY", SECRETS[2])
    store = [
        "--store",
        s3_store.url,
        "--store-option",
        f"endpoint_url={s3_store.options['endpoint_url']}",
        "--store-option",
        f"key={SECRETS[0]}",
        "--store-option",
        f"secret={SECRETS[1]}",
    ]
    runner = CliRunner()
    commands = [
        ["run", "-s", "cli-leaks", "--json", "x = 41\nx + 1"],
        ["run", "-s", "cli-leaks", "--json", "import os\nraise KeyError(x)"],
        ["history", "cli-leaks", "--json"],
        ["vars", "cli-leaks", "--json"],
        ["show", "cli-leaks", "1", "--json"],
        ["sessions", "--json"],
    ]
    outputs = []
    for command in commands:
        result = runner.invoke(app, [*command, *store])
        assert result.exit_code in (0, 1), result.output
        outputs.append(result.stdout + result.stderr)
    assert json.loads(outputs[0])["value"] == "42"
    assert json.loads(outputs[1])["error"]["type"] == "KeyError"
    for secret in SECRETS:
        for output in outputs:
            assert secret not in output
