"""The jobrunner command, through typer's runner and as a real process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from jobrunner.cli import app

Invoke = Callable[..., Result]


@pytest.fixture
def cli(store_url: str, monkeypatch: pytest.MonkeyPatch) -> Invoke:
    monkeypatch.setenv("JOBRUNNER_STORE", store_url)
    runner = CliRunner()

    def invoke(*args: str, stdin: str | None = None) -> Result:
        return runner.invoke(app, list(args), input=stdin)

    return invoke


def test_a_session_of_several_steps(cli: Invoke) -> None:
    assert cli("run", "-s", "demo", "import math; r = 2").exit_code == 0
    assert (
        cli("run", "-s", "demo", "def area(): return math.pi * r ** 2").exit_code == 0
    )
    third = cli("run", "-s", "demo", "r = 3; area()")
    assert third.exit_code == 0
    assert "28.274333882308138" in third.stdout

    history = cli("history", "demo")
    assert history.exit_code == 0
    for text in ("step", "status", "code", "names changed", "area"):
        assert text in history.stdout

    variables = cli("vars", "demo")
    assert variables.exit_code == 0
    assert "area" in variables.stdout and "function" in variables.stdout


def test_json_output(cli: Invoke) -> None:
    result = json.loads(cli("run", "-s", "j", "--json", "x = 41\nx + 1").stdout)
    assert (result["status"], result["value"], result["step"]) == ("ok", "42", 1)

    history = json.loads(cli("history", "j", "--json").stdout)
    assert [entry["step"] for entry in history] == [1]
    variables = json.loads(cli("vars", "j", "--json").stdout)
    assert variables == [
        {"name": "x", "type": "int", "size": variables[0]["size"], "kind": "value"}
    ]
    sessions = json.loads(cli("sessions", "--json").stdout)
    assert sessions == [{"session": "j", "step": 1}]
    shown = json.loads(cli("show", "j", "1", "--json").stdout)
    assert shown["code"] == "x = 41\nx + 1"


def test_code_from_a_file_and_from_stdin(cli: Invoke, tmp_path: Path) -> None:
    script = tmp_path / "step.py"
    script.write_text("y = 5\nprint('from file')")
    from_file = cli("run", "-s", "io", "-f", str(script))
    assert from_file.exit_code == 0 and "from file" in from_file.stdout
    from_stdin = cli("run", "-s", "io", "-", stdin="y * 2\n")
    assert from_stdin.exit_code == 0 and "10" in from_stdin.stdout


@pytest.mark.parametrize(
    ("args", "code"),
    [
        (("run", "-s", "e", "1/0"), 1),
        (("run", "-s", "e", "--timeout", "0.5", "import time; time.sleep(30)"), 1),
        (("run", "-s", "../x", "1"), 2),
        (("run", "1"), 2),
        (("run", "-s", "e"), 2),
        (("history", "missing"), 2),
        (("vars", "BAD ID"), 2),
        (("run", "-s", "e", "--no-such-option", "1"), 2),
    ],
)
def test_exit_codes(cli: Invoke, args: tuple[str, ...], code: int) -> None:
    result = cli(*args)
    assert result.exit_code == code, result.output


def test_a_user_error_shows_the_traceback(cli: Invoke) -> None:
    result = cli("run", "-s", "tb", "def f():\n    raise KeyError('k')\nf()")
    assert result.exit_code == 1
    assert "KeyError: 'k'" in result.stderr
    assert 'File "<step 1>", line 3' in result.stderr


def test_an_unreachable_store_exits_3(cli: Invoke, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    result = cli("run", "-s", "s", "--store", "gs://bucket", "1")
    assert result.exit_code == 3
    assert "install gcsfs" in result.stderr


def test_the_installed_command_streams_output(store_url: str) -> None:
    environment = {**os.environ, "JOBRUNNER_STORE": store_url}
    command = [sys.executable, "-m", "jobrunner.cli", "run", "-s", "live"]
    code = "import time\nprint('first', flush=True)\ntime.sleep(1)\nprint('second')"
    with subprocess.Popen(
        [*command, code], stdout=subprocess.PIPE, text=True, env=environment
    ) as process:
        assert process.stdout is not None
        assert process.stdout.readline() == "first\n"
        assert process.poll() is None, "the first line arrives while the step runs"
        assert process.stdout.readline() == "second\n"
        assert process.wait(timeout=30) == 0
