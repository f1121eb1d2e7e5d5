"""Batch notebooks: reading, parameters, tags, the output notebook, resume, CLI."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook
from typer.testing import CliRunner

from jobrunner import InvalidInput, Session
from jobrunner.backends.local import LocalBackend
from jobrunner.cli import app
from jobrunner.notebook import (
    CellRun,
    CellStart,
    default_session_id,
    inject_parameters,
    parse_parameter,
    read_notebook,
    read_parameters,
    read_percent_script,
    run_notebook,
)

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "notebooks"


def _notebook(path: Path, *cells: Any) -> str:
    made = [new_code_cell(c) if isinstance(c, str) else c for c in cells]
    nbformat.write(new_notebook(cells=made), path)
    return str(path)


def _outputs(cell: Any) -> list[tuple[str, Any]]:
    found = []
    for output in cell.outputs:
        if output.output_type == "stream":
            found.append((output.name, output.text))
        elif output.output_type == "error":
            found.append(("error", (output.ename, output.evalue)))
        else:
            found.append((output.output_type, sorted(output.data)))
    return found


# Reading


def test_percent_script_cells_markdown_and_tags() -> None:
    notebook = read_percent_script(
        "# ---\n# jupyter:\n#   jupytext: {}\n# ---\n"
        "import os\n\n"
        "# %% [markdown]\n# # Title\n#\n# Some *text*.\n\n"
        '# %% tags=["parameters"] custom={"a": 1}\n'
        "x = 1\n\n\n"
        "# %% A title\n"
        "print(x)\n"
    )

    cells = [(c.cell_type, c.source, dict(c.metadata)) for c in notebook.cells]
    assert cells == [
        ("code", "import os", {}),
        ("markdown", "# Title\n\nSome *text*.", {}),
        ("code", "x = 1", {"tags": ["parameters"], "custom": {"a": 1}}),
        ("code", "print(x)", {}),
    ]
    nbformat.validate(notebook)


def test_percent_script_bad_option_is_invalid_input() -> None:
    with pytest.raises(InvalidInput, match="key=JSON: tags"):
        read_percent_script("# %% tags=[parameters]\nx = 1\n")


def test_non_python_notebook_is_refused(tmp_path: Path) -> None:
    notebook = new_notebook(cells=[new_code_cell("1")])
    notebook.metadata["kernelspec"] = {"name": "ir", "language": "R"}
    nbformat.write(notebook, tmp_path / "r.ipynb")

    with pytest.raises(InvalidInput, match="is a R notebook"):
        read_notebook(str(tmp_path / "r.ipynb"))


def test_not_a_notebook_is_invalid_input(tmp_path: Path) -> None:
    (tmp_path / "bad.ipynb").write_text("{not json")

    with pytest.raises(InvalidInput, match="is not a Jupyter notebook"):
        read_notebook(str(tmp_path / "bad.ipynb"))


# Parameters


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("n=3", ("n", 3)),
        ("rate=0.5", ("rate", 0.5)),
        ("flag=true", ("flag", True)),
        ("empty=null", ("empty", None)),
        ("name=Ada Lovelace", ("name", "Ada Lovelace")),
        ("quoted='3'", ("quoted", "3")),
        ("day=2024-01-31", ("day", "2024-01-31")),
        ("items=[1, 2]", ("items", [1, 2])),
        ("equation=a=b", ("equation", "a=b")),
        ("blank=", ("blank", None)),
    ],
)
def test_parse_parameter_keeps_yaml_types(text: str, expected: Any) -> None:
    assert parse_parameter(text) == expected


@pytest.mark.parametrize("text", ["n", "3n=1", "a-b=2"])
def test_bad_parameter_is_invalid_input(text: str) -> None:
    with pytest.raises(InvalidInput):
        parse_parameter(text)


def test_parameters_file(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text("n: 2\nlabels: [a, b]\nlimits: {low: 0.5, high: null}\n")
    (tmp_path / "list.yaml").write_text("- 1\n")

    assert read_parameters(str(path)) == {
        "n": 2,
        "labels": ["a", "b"],
        "limits": {"low": 0.5, "high": None},
    }
    with pytest.raises(InvalidInput, match="must hold a mapping"):
        read_parameters(str(tmp_path / "list.yaml"))


def test_parameters_are_injected_after_the_parameters_cell() -> None:
    notebook = new_notebook(
        cells=[
            new_markdown_cell("title"),
            new_code_cell("n = 1", metadata={"tags": ["parameters"]}),
            new_code_cell(
                "# Parameters\nn = 0", metadata={"tags": ["injected-parameters"]}
            ),
            new_code_cell("print(n)"),
        ]
    )

    inject_parameters(notebook, {"n": 2, "x": float("nan"), "d": {"k": [True, None]}})

    assert [c.source for c in notebook.cells] == [
        "title",
        "n = 1",
        "# Parameters\nn = 2\nx = float(\"nan\")\nd = {'k': [True, None]}",
        "print(n)",
    ]
    assert notebook.cells[2].metadata.tags == ["injected-parameters"]
    nbformat.validate(notebook)


def test_parameters_go_at_the_top_without_a_parameters_cell() -> None:
    notebook = nbformat.v4.upgrade(
        nbformat.from_dict(
            {"nbformat": 4, "nbformat_minor": 0, "metadata": {}, "cells": []}
        )
    )
    notebook.cells = [new_code_cell("print(n)")]
    for cell in notebook.cells:
        del cell["id"]
    notebook.nbformat_minor = 0

    inject_parameters(notebook, {"n": "x"})

    assert [c.source for c in notebook.cells] == ["# Parameters\nn = 'x'", "print(n)"]
    nbformat.validate(notebook)  # no cell id before nbformat 4.5


def test_default_session_id_is_a_dns_label() -> None:
    made = [
        default_session_id("reports/Sales Q3 (final).ipynb"),
        default_session_id("s3://bucket/" + "x" * 100 + ".py"),
        default_session_id("___.ipynb"),
    ]

    for session in made:
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?", session), session
    assert made[0].startswith("sales-q3-final-")
    assert made[2].startswith("notebook-")
    assert default_session_id("a.ipynb") != default_session_id("a.ipynb")


# Running


def test_example_notebook_with_parameters(tmp_path: Path) -> None:
    output = tmp_path / "out.ipynb"

    run = run_notebook(
        str(EXAMPLES / "squares.ipynb"),
        parameters={"n": 4, "scale": 0.5, "label": "hi"},
        session="squares",
        output=str(output),
        store=str(tmp_path / "store"),
    )

    written = nbformat.read(output, as_version=4)
    assert run.status == "completed" and run.ok and run.stopped_at is None
    assert written == run.notebook
    code = [c for c in written.cells if c.cell_type == "code"]
    assert [c.execution_count for c in code] == [1, 2, 3, None, 4, 5]
    assert code[1].metadata.tags == ["injected-parameters"]
    assert _outputs(code[2]) == [("stdout", "int float bool hi\n")]
    assert code[3].metadata.jobrunner == {"status": "skipped", "step": None}
    assert _outputs(code[4]) == [
        ("stderr", "total\n"),
        ("execute_result", ["text/plain"]),
    ]
    assert code[4].outputs[1].data["text/plain"] == "7.0"
    assert code[4].outputs[1].execution_count == 4
    assert [c.metadata.jobrunner["step"] for c in code] == [1, 2, 3, None, 4, 5]
    assert set(code[0].metadata.execution) == {
        "iopub.status.busy",
        "iopub.execute_input",
        "shell.execute_reply",
        "iopub.status.idle",
    }
    assert written.metadata.jobrunner["status"] == "completed"
    assert written.metadata.jobrunner["parameters"] == {
        "n": 4,
        "scale": 0.5,
        "label": "hi",
    }
    assert Session("squares", store=str(tmp_path / "store")).head == 5
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_percent_example_records_a_tolerated_error(
    tmp_path: Path, backend: LocalBackend
) -> None:
    run = run_notebook(
        str(EXAMPLES / "greeting.py"),
        parameters={"name": "Ada"},
        store=str(tmp_path / "store"),
        backend=backend,
    )

    code = [c for c in run.notebook.cells if c.cell_type == "code"]
    assert run.status == "completed"
    assert run.session.startswith("greeting-")
    assert [c.status for c in run.cells] == ["ok", "ok", "ok", "error", "ok"]
    assert _outputs(code[2]) == [("stdout", "hello, Ada\nhello, Ada\n")]
    assert _outputs(code[3]) == [
        ("error", ("ValueError", "this error is recorded and the run goes on"))
    ]
    assert code[3].outputs[0].traceback[0] == "Traceback (most recent call last):"
    assert code[4].outputs[0].data["text/plain"] == "6"


def test_an_error_stops_the_run_and_the_notebook_is_written_after_each_cell(
    tmp_path: Path,
) -> None:
    path = _notebook(tmp_path / "nb.ipynb", "x = 1", "print(x)\n1 / 0", "print('no')")
    output = tmp_path / "out.ipynb"
    seen_on_disk: list[list[int | None]] = []

    def after_cell(cell: CellRun) -> None:
        written = nbformat.read(output, as_version=4)
        seen_on_disk.append([c.execution_count for c in written.cells])

    run = run_notebook(
        path,
        output=str(output),
        store=str(tmp_path / "store"),
        on_cell_end=after_cell,
    )

    written = nbformat.read(output, as_version=4)
    assert run.status == "failed" and not run.ok
    assert run.stopped_at is not None and run.stopped_at.index == 1
    assert seen_on_disk == [[1, None, None], [1, 2, None]]
    assert _outputs(written.cells[1]) == [
        ("stdout", "1\n"),
        ("error", ("ZeroDivisionError", "division by zero")),
    ]
    assert written.cells[1].metadata.jobrunner["status"] == "failed"
    assert (
        written.cells[2].outputs == [] and "jobrunner" not in written.cells[2].metadata
    )
    assert written.metadata.jobrunner["status"] == "failed"
    assert written.metadata.jobrunner["stopped_at"] == 1
    assert written.metadata.jobrunner["error"] == {
        "type": "ZeroDivisionError",
        "message": "division by zero",
    }


@pytest.mark.parametrize(
    ("code", "status"),
    [("sys.exit()", "exited"), ("sys.exit(0)", "exited"), ("sys.exit(3)", "failed")],
)
def test_system_exit_stops_the_run(tmp_path: Path, code: str, status: str) -> None:
    path = _notebook(tmp_path / "nb.ipynb", f"import sys\n{code}", "print('no')")

    run = run_notebook(path, store=str(tmp_path / "store"))

    assert run.status == status and run.ok == (status == "exited")
    assert [c.status for c in run.cells] == [status]
    assert run.notebook.cells[1].execution_count is None


def test_a_cell_that_times_out_stops_the_run(tmp_path: Path) -> None:
    path = _notebook(
        tmp_path / "nb.ipynb",
        new_code_cell(
            "import time\ntime.sleep(30)", metadata={"tags": ["raises-exception"]}
        ),
        "print('no')",
    )

    run = run_notebook(path, store=str(tmp_path / "store"), timeout=1)

    assert run.status == "failed"
    assert run.cells[0].result is not None and run.cells[0].result.status == "timeout"
    assert _outputs(run.notebook.cells[0])[0][1][0] == "Timeout"


def test_a_figure_becomes_an_image_output(
    tmp_path: Path, backend: LocalBackend
) -> None:
    pytest.importorskip("matplotlib")
    path = _notebook(
        tmp_path / "nb.ipynb",
        "import matplotlib.pyplot as plt\nfig, ax = plt.subplots()\nax.plot([1, 3, 2])",
        "fig.axes[0].get_lines()[0].get_ydata().tolist()",
    )

    run = run_notebook(path, store=str(tmp_path / "store"), backend=backend)

    first, second = (c for c in run.notebook.cells)
    assert run.status == "completed"
    assert [o.output_type for o in first.outputs] == ["display_data", "execute_result"]
    image = first.outputs[0].data["image/png"]
    assert image.startswith("iVBORw0KGgo")  # base64 of the PNG signature
    # The figure was closed once shown: a later cell does not show it again.
    assert [o.output_type for o in second.outputs] == ["execute_result"]
    assert second.outputs[0].data["text/plain"] == "[1, 3, 2]"


def test_notebook_and_output_at_fsspec_urls(tmp_path: Path) -> None:
    fsspec = pytest.importorskip("fsspec")
    with fsspec.open("memory://notebooks/in.py", "w") as stream:
        stream.write('# %% tags=["parameters"]\nn = 1\n\n# %%\nn * 2\n')

    run = run_notebook(
        "memory://notebooks/in.py",
        parameters={"n": 21},
        output="memory://notebooks/out.ipynb",
        store=str(tmp_path / "store"),
    )

    with fsspec.open("memory://notebooks/out.ipynb", "r") as stream:
        written = nbformat.read(stream, as_version=4)
    assert run.status == "completed"
    assert written.cells[2].outputs[0].data["text/plain"] == "42"
    fsspec.filesystem("memory").rm("/notebooks", recursive=True)


# Resume


def _resumable(tmp_path: Path, third: str) -> str:
    """A notebook whose second cell counts its runs in a file."""
    counter = tmp_path / "runs.txt"
    return _notebook(
        tmp_path / "nb.ipynb",
        "total = 1",
        f"with open({str(counter)!r}, 'a') as f:\n    f.write('x')\ntotal += 1\ntotal",
        new_code_cell("int('oops')", metadata={"tags": ["raises-exception"]}),
        third,
        "total * 10",
    )


def test_resume_goes_on_from_the_cell_that_stopped(tmp_path: Path) -> None:
    flag = tmp_path / "ready"
    path = _resumable(
        tmp_path, f"import os\nassert os.path.exists({str(flag)!r}), 'not ready'"
    )
    output, store = str(tmp_path / "out.ipynb"), str(tmp_path / "store")
    first = run_notebook(path, output=output, store=store, parameters={"p": 1})
    flag.touch()

    second = run_notebook(path, output=output, store=store, resume=True)

    written = nbformat.read(output, as_version=4)
    assert first.status == "failed" and first.stopped_at is not None
    assert second.status == "completed" and second.session == first.session
    assert second.resumed_at == first.stopped_at.index == 4
    assert [c.index for c in second.cells] == [4, 5]
    assert (tmp_path / "runs.txt").read_text() == "x"  # not run again
    assert [c.execution_count for c in written.cells] == [1, 2, 3, 4, 5, 6]
    assert written.cells[2].outputs[0].data["text/plain"] == "2"
    assert _outputs(written.cells[3]) == [
        ("error", ("ValueError", "invalid literal for int() with base 10: 'oops'"))
    ]
    assert written.cells[5].outputs[0].data["text/plain"] == "20"
    assert [c.metadata.jobrunner["step"] for c in written.cells] == [
        1,
        2,
        3,
        None,
        4,
        5,
    ]
    assert written.metadata.jobrunner["status"] == "completed"
    assert "error" not in written.metadata.jobrunner
    assert written.cells[0].source == "# Parameters\np = 1"


def test_resume_runs_the_fixed_cell_but_refuses_a_changed_finished_cell(
    tmp_path: Path,
) -> None:
    path = _resumable(tmp_path, "1 / 0")
    output, store = str(tmp_path / "out.ipynb"), str(tmp_path / "store")
    run_notebook(path, output=output, store=store)
    notebook = nbformat.read(path, as_version=4)
    notebook.cells[3].source = "total += 1"
    nbformat.write(notebook, path)

    fixed = run_notebook(path, output=output, store=store, resume=True)

    assert fixed.status == "completed"
    assert fixed.notebook.cells[4].outputs[0].data["text/plain"] == "30"
    notebook.cells[0].source = "total = 2"
    nbformat.write(notebook, path)
    with pytest.raises(InvalidInput, match="cell 1 changed since it ran"):
        run_notebook(path, output=output, store=store, resume=True)


def test_resume_takes_a_step_that_committed_before_the_notebook_was_written(
    tmp_path: Path,
) -> None:
    path = _resumable(tmp_path, "total += 5")
    output, store = str(tmp_path / "out.ipynb"), str(tmp_path / "store")

    def die_before_the_last_cell(cell: CellStart) -> None:
        if cell.index == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_notebook(
            path, output=output, store=store, on_cell_start=die_before_the_last_cell
        )
    # As if the run had died right after the fourth cell committed, before the
    # notebook was written.
    crashed = nbformat.read(output, as_version=4)
    for cell in crashed.cells[3:]:
        cell.outputs, cell.execution_count, cell.metadata = [], None, {}
    nbformat.write(crashed, output)

    resumed = run_notebook(path, output=output, store=store, resume=True)

    written = nbformat.read(output, as_version=4)
    assert resumed.status == "completed"
    assert [c.index for c in resumed.cells] == [4]
    assert written.cells[3].metadata.jobrunner["step"] == 3
    assert written.cells[4].outputs[0].data["text/plain"] == "70"
    assert Session(resumed.session, store=store).head == 4


def test_resume_refuses_a_session_that_moved_on(tmp_path: Path) -> None:
    path = _resumable(tmp_path, "1 / 0")
    output, store = str(tmp_path / "out.ipynb"), str(tmp_path / "store")
    run = run_notebook(path, output=output, store=store)
    Session(run.session, store=store).run("total = 0")

    with pytest.raises(InvalidInput, match="is at step 3, but the notebook's last"):
        run_notebook(path, output=output, store=store, resume=True)


def test_resume_needs_an_earlier_run(tmp_path: Path) -> None:
    path = _notebook(tmp_path / "nb.ipynb", "1")

    with pytest.raises(InvalidInput, match="nothing to resume"):
        run_notebook(path, output=str(tmp_path / "none.ipynb"), resume=True)
    with pytest.raises(InvalidInput, match="needs the output notebook"):
        run_notebook(path, resume=True)


# The command line


def test_cli_runs_a_notebook_with_parameters(tmp_path: Path) -> None:
    (tmp_path / "params.yaml").write_text("label: from-file\nn: 1\n")
    output = tmp_path / "out.ipynb"

    result = CliRunner().invoke(
        app,
        [
            "notebook",
            "run",
            str(EXAMPLES / "squares.ipynb"),
            "-f",
            str(tmp_path / "params.yaml"),
            "-p",
            "n=2",
            "-p",
            "scale=2",
            "--output",
            str(output),
            "--store",
            str(tmp_path / "store"),
            "--session",
            "cli-squares",
        ],
    )

    assert result.exit_code == 0, result.output
    written = nbformat.read(output, as_version=4)
    assert written.metadata.jobrunner["parameters"] == {
        "label": "from-file",
        "n": 2,
        "scale": 2,
    }
    assert "int int bool from-file" in result.stderr
    assert "completed session cli-squares: 5 cells ran" in result.stderr


def test_cli_writes_the_notebook_to_stdout(tmp_path: Path) -> None:
    path = _notebook(tmp_path / "nb.ipynb", "print('hi')")

    result = CliRunner().invoke(
        app, ["notebook", "run", path, "-o", "-", "--store", str(tmp_path / "store")]
    )

    assert result.exit_code == 0, result.output
    notebook = nbformat.reads(result.stdout, as_version=4)
    assert notebook.cells[0].outputs[0].text == "hi\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nb.ipynb", "store"]


def test_cli_reports_the_failing_cell_and_exits_1(tmp_path: Path) -> None:
    path = _notebook(tmp_path / "nb.ipynb", "x = 1", "assert x == 2, 'x is not 2'")

    result = CliRunner().invoke(
        app, ["notebook", "run", path, "--store", str(tmp_path / "store")]
    )

    assert result.exit_code == 1
    assert "failed at cell 2 of 2 (In [2]): AssertionError: x is not 2" in " ".join(
        result.stderr.split()
    )
    written = nbformat.read(tmp_path / "nb.out.ipynb", as_version=4)
    assert written.metadata.jobrunner["stopped_at"] == 1


def test_cli_bad_parameter_exits_2(tmp_path: Path) -> None:
    path = _notebook(tmp_path / "nb.ipynb", "1")

    result = CliRunner().invoke(
        app, ["notebook", "run", path, "-p", "no-equals", "--store", str(tmp_path)]
    )

    assert result.exit_code == 2
    assert "a parameter is written name=value" in result.stderr


def test_cli_resume(tmp_path: Path) -> None:
    flag = tmp_path / "ready"
    path = _notebook(
        tmp_path / "nb.ipynb",
        "n = 1",
        f"import os\nassert os.path.exists({str(flag)!r})\nn + 1",
    )
    arguments = ["notebook", "run", path, "--store", str(tmp_path / "store")]
    assert CliRunner().invoke(app, arguments).exit_code == 1
    flag.touch()

    result = CliRunner().invoke(app, [*arguments, "--resume"])

    assert result.exit_code == 0, result.output
    written = nbformat.read(tmp_path / "nb.out.ipynb", as_version=4)
    assert written.cells[1].outputs[0].data["text/plain"] == "2"
    assert json.dumps(written.metadata.jobrunner["status"]) == '"completed"'
