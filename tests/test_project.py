"""The repository explains itself: examples run, the README's commands hold."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from jobrunner import Session

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _commands() -> list[str]:
    start = README.index("## Quick start")
    section = README[start : README.index("\n## ", start + 1)]
    return re.findall(r"```\n(.+?)\n```", section)


def test_the_readme_has_two_setup_commands_and_ci_runs_the_second() -> None:
    install_and_run, test = _commands()
    assert install_and_run.startswith("pip install . && python examples/")
    ci = (ROOT / ".ci" / "run").read_text()
    assert test in ci


def test_the_quickstart_example_runs(store_url: str) -> None:
    script = _commands()[0].split("&& python ")[1]
    environment = {**os.environ, "JOBRUNNER_STORE": store_url}
    done = subprocess.run(
        [sys.executable, script],
        cwd=ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "28.274333882308138" in done.stdout
    assert "NameError" in done.stdout and "(True, 3)" in done.stdout
    assert "8 steps" in done.stdout


def test_the_runtime_imports_nothing_of_the_control_side(store_url: str) -> None:
    session = Session("imports", store=store_url)
    session.run("x = 1")
    result = session.run(
        "import sys\nsorted({m.split('.')[0] for m in sys.modules}"
        " & {'kubernetes', 'typer', 'rich', 'fsspec', 'dill', 'jobrunner.session'})"
    )
    assert result.value == "[]"


@pytest.mark.parametrize(
    "command",
    [
        ["ruff", "format", "--check", "jobrunner", "tests", "benchmarks", "examples"],
        ["ruff", "check", "jobrunner", "tests", "benchmarks", "examples"],
        ["mypy", "jobrunner"],
    ],
    ids=["ruff-format", "ruff-check", "mypy"],
)
def test_code_quality(command: list[str]) -> None:
    if shutil.which(command[0]) is None:
        pytest.skip(f"{command[0]} is not installed (it is in the test extra)")
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
