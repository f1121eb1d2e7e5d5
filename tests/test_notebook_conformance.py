"""Notebooks run through jobrunner agree, cell by cell, with a Jupyter kernel.

The corpus is real notebooks from nbclient's and papermill's tests, kept beside
the repository in ``shared/conformance``. The reference is nbclient driving an
ipykernel kernel: one long-lived interpreter. jobrunner runs each code cell as a
step in a fresh process. For every code cell both must agree on whether it ran,
was skipped, stopped the run or was not reached; on its stdout and stderr text;
on its errors (type name and message); on the ``text/plain`` of its result; and
on its execution count.
"""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path
from typing import Any

import pytest

# jupyter_core warns that its folders will move unless the new ones are chosen;
# choosing them here keeps that warning (an error under pytest) away.
os.environ.setdefault("JUPYTER_PLATFORM_DIRS", "1")

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

from nbclient.exceptions import CellExecutionError  # noqa: E402

from jobrunner.notebook import inject_parameters, run_notebook  # noqa: E402

CORPUS = Path(__file__).parents[2] / "shared" / "conformance" / "notebooks"
NOTEBOOKS = sorted(str(path.relative_to(CORPUS)) for path in CORPUS.glob("*/*.ipynb"))

# Parameters injected (the same cell, on both sides) into the notebooks that
# papermill's tests run with parameters.
PARAMETERS = {
    "papermill/simple_execute.ipynb": {"msg": "Hello"},
    "papermill/complex_parameters.ipynb": {"msg": "Hello", "a": 3.5},
    "papermill/no_parameters.ipynb": {"msg": "Hello"},
}

# Differences that are not the cell's doing, and how each is taken out:
#
# - The cell prints the time of day, which differs between any two runs: its
#   digits are masked.
TIMESTAMPS = {"nbclient/Sleep1s.ipynb"}
# - After SystemExit, IPython's interactive shell adds a hint on stderr ("To
#   exit: use 'exit', 'quit', or Ctrl-D."); a step is not an interactive shell
#   and does not print it. The hint is removed from the kernel's stderr.
EXIT_HINT = re.compile(
    r"[^\n]*UserWarning: To exit: use 'exit', 'quit', or Ctrl-D\.\n[^\n]*\n"
)
# - A SyntaxError names the code's file: the kernel names a cell after a hash
#   of its code, a step after its number ("<step 1>"). Only the line is kept.
SYNTAX_LOCATION = re.compile(r"\([^()]*, line (\d+)\)$")

# Notebooks that cannot agree because every step is a fresh process, with the
# reason. None in the corpus needs it today: each difference above is one of
# presentation, not of behaviour.
INHERENT: dict[str, str] = {}


def _reference(notebook: Any) -> tuple[Any, dict[int, str]]:
    """Run a notebook in an ipykernel kernel; return it and each cell's fate."""
    started: list[int] = []
    client = nbclient.NotebookClient(
        notebook,
        kernel_name="python3",
        allow_errors=False,
        timeout=120,
        # Called once the kernel replied, so not for an empty cell, which
        # nbclient skips after calling its on_cell_start hook.
        on_cell_executed=lambda cell, cell_index, execute_reply: started.append(
            cell_index
        ),
    )
    stopped = None
    try:
        client.execute()
    except CellExecutionError:
        stopped = started[-1]
    fates = {}
    for index, cell in enumerate(notebook.cells):
        if cell.cell_type != "code":
            continue
        if index == stopped:
            fates[index] = "stopped"
        elif index in started:
            fates[index] = "ran"
        else:
            reached = stopped is None or index < stopped
            fates[index] = "skipped" if reached else "not reached"
    return notebook, fates


def _jobrunner_fates(notebook: Any) -> dict[int, str]:
    by_status = {
        "ok": "ran",
        "error": "ran",
        "failed": "stopped",
        "exited": "stopped",
        "skipped": "skipped",
    }
    return {
        index: by_status.get(
            cell.metadata.get("jobrunner", {}).get("status"), "not reached"
        )
        for index, cell in enumerate(notebook.cells)
        if cell.cell_type == "code"
    }


def _observed(cell: Any, name: str, *, kernel: bool) -> dict[str, Any]:
    """What is compared of a cell's outputs, normalized as described above."""
    streams = {"stdout": "", "stderr": ""}
    errors, results = [], []
    for output in cell.outputs:
        if output.output_type == "stream":
            streams[output.name] += output.text
        elif output.output_type == "error":
            errors.append((output.ename, _message(output.ename, output.evalue)))
        elif output.output_type == "execute_result":
            results.append(output.data.get("text/plain"))
    if kernel:
        streams["stderr"] = EXIT_HINT.sub("", streams["stderr"])
    if name in TIMESTAMPS:
        streams = {key: re.sub(r"\d", "0", text) for key, text in streams.items()}
    return {
        "streams": streams,
        "errors": errors,
        "results": results,
        "execution_count": cell.execution_count,
    }


def _message(ename: str, evalue: str) -> str:
    if ename == "SyntaxError":
        return SYNTAX_LOCATION.sub(r"(line \1)", evalue)
    return evalue


@pytest.mark.parametrize(
    "name",
    NOTEBOOKS
    or [
        pytest.param(
            None,
            marks=pytest.mark.skip(
                reason=f"the conformance corpus is not there: {CORPUS}"
            ),
        )
    ],
)
def test_notebook_agrees_with_a_jupyter_kernel(name: str, tmp_path: Path) -> None:
    if name in INHERENT:
        pytest.skip(INHERENT[name])
    source = nbformat.read(CORPUS / name, as_version=4)
    parameters = PARAMETERS.get(name, {})
    reference_input = copy.deepcopy(source)
    if parameters:
        inject_parameters(reference_input, parameters)
    reference, reference_fates = _reference(reference_input)

    run = run_notebook(
        str(CORPUS / name),
        parameters=parameters,
        session="conformance",
        store=str(tmp_path / "store"),
        output=str(tmp_path / "out.ipynb"),
    )
    executed = nbformat.read(tmp_path / "out.ipynb", as_version=4)

    assert [c.source for c in executed.cells] == [c.source for c in reference.cells]
    assert _jobrunner_fates(executed) == reference_fates
    for index, fate in reference_fates.items():
        if fate in ("ran", "stopped"):
            ours = _observed(executed.cells[index], name, kernel=False)
            theirs = _observed(reference.cells[index], name, kernel=True)
            assert ours == theirs, f"cell {index} of {name}"
    assert run.notebook.cells == executed.cells
