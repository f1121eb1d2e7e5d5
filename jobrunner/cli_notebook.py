"""The ``jobrunner notebook`` commands: run a notebook cell by cell as steps.

Exit codes follow the ``jobrunner`` command's: 0 when the notebook ran to its
end (or a cell ended it with ``sys.exit(0)``), 1 when a cell stopped it with an
error, 2 for bad usage or bad input, 3 for a failure of jobrunner, its store or
its backend.
"""

from __future__ import annotations

import json
import sys
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)

from jobrunner.errors import InvalidInput, JobRunnerError
from jobrunner.notebook import (
    CellRun,
    CellStart,
    NotebookRun,
    notebook_text,
    parse_parameter,
    read_parameters,
    run_notebook,
)

__all__ = ["notebook_app"]

EXIT_CELL_FAILED = 1
EXIT_USAGE = 2
EXIT_JOBRUNNER = 3

notebook_app = typer.Typer(
    help="Run notebooks cell by cell, each code cell a step of one session.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)
# Everything but the notebook itself goes to stderr, so that `--output -` can
# write the notebook to stdout.
terminal = Console(stderr=True)


def _fail(message: str, code: int) -> NoReturn:
    terminal.print(f"[red]error:[/red] {escape(message)}", highlight=False)
    raise typer.Exit(code)


def _store_options(pairs: list[str] | None) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for pair in pairs or []:
        key, separator, value = pair.partition("=")
        if not separator or not key:
            _fail(f"--store-option expects KEY=VALUE, got {pair!r}", EXIT_USAGE)
        try:
            options[key] = json.loads(value)
        except ValueError:
            options[key] = value
    return options


def _default_output(notebook: str) -> str:
    stem = (
        notebook.rsplit(".", 1)[0] if "." in notebook.rsplit("/", 1)[-1] else notebook
    )
    return f"{stem}.out.ipynb"


class _Watch:
    """A progress bar over the cells, with the running cell's output above it."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.task = progress.add_task("starting", total=None)
        self.pending = {"stdout": "", "stderr": ""}

    def cell_started(self, cell: CellStart) -> None:
        first = cell.source.strip().splitlines()[0] if cell.source.strip() else ""
        self.progress.update(
            self.task,
            total=cell.total,
            completed=cell.number - 1,
            description=f"cell {cell.index + 1}: {escape(first[:40])}",
        )

    def cell_ended(self, cell: CellRun) -> None:
        self.flush()
        if cell.status != "skipped":
            self.progress.advance(self.task)

    def output(self, stream: str, text: str) -> None:
        lines = (self.pending[stream] + text).split("\n")
        self.pending[stream] = lines.pop()
        for line in lines:
            self._print(stream, line)

    def flush(self) -> None:
        for stream, text in self.pending.items():
            if text:
                self._print(stream, text)
        self.pending = {"stdout": "", "stderr": ""}

    def _print(self, stream: str, line: str) -> None:
        style = "red" if stream == "stderr" else None
        self.progress.console.print(
            line, style=style, markup=False, highlight=False, soft_wrap=True
        )


@notebook_app.command("run")
def run(
    notebook: Annotated[
        str, typer.Argument(help="The notebook: .ipynb or a percent-format .py.")
    ],
    parameter: Annotated[
        list[str] | None,
        typer.Option(
            "--parameter",
            "-p",
            metavar="NAME=VALUE",
            help="A parameter; the value is YAML: 3, 0.5, true, null, text.",
        ),
    ] = None,
    parameters_file: Annotated[
        str | None,
        typer.Option(
            "--parameters-file", "-f", help="A YAML or JSON file of parameters."
        ),
    ] = None,
    session: Annotated[
        str | None,
        typer.Option(
            "--session", "-s", help="Session id (default: from the notebook's name)."
        ),
    ] = None,
    output: Annotated[
        str | None,
        typer.Option(
            "--output",
            "-o",
            help="Where to write the executed notebook; - for stdout.",
            show_default="NOTEBOOK.out.ipynb",
        ),
    ] = None,
    resume: Annotated[
        bool,
        typer.Option(
            help="Continue the run in --output from its first unfinished cell."
        ),
    ] = False,
    timeout: Annotated[
        float | None, typer.Option(help="Stop a cell after this many seconds.")
    ] = None,
    store: Annotated[
        str | None,
        typer.Option(
            envvar="JOBRUNNER_STORE",
            help="Checkpoint store: a folder or an fsspec URL.",
            show_default="./checkpoints",
        ),
    ] = None,
    store_option: Annotated[
        list[str] | None,
        typer.Option(metavar="KEY=VALUE", help="An option of the store's filesystem."),
    ] = None,
) -> None:
    """Run a notebook's cells in order, each as one step of a session."""
    to_stdout = output == "-"
    if to_stdout and resume:
        _fail("--resume needs the notebook of the run in a file: --output PATH", 2)
    target = None if to_stdout else output or _default_output(notebook)
    try:
        parameters = read_parameters(parameters_file) if parameters_file else {}
        parameters.update(parse_parameter(text) for text in parameter or [])
        outcome = _run_watched(
            notebook,
            parameters=parameters if parameters or not resume else None,
            session=session,
            output=target,
            resume=resume,
            store=store,
            store_options=_store_options(store_option),
            timeout=timeout,
        )
    except InvalidInput as error:
        _fail(str(error), EXIT_USAGE)
    except JobRunnerError as error:
        _fail(str(error), EXIT_JOBRUNNER)
    if to_stdout:
        sys.stdout.write(notebook_text(outcome.notebook))
    _report(outcome)
    raise typer.Exit(0 if outcome.ok else EXIT_CELL_FAILED)


def _run_watched(notebook: str, **arguments: Any) -> NotebookRun:
    columns = (
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=terminal, transient=True) as progress:
        watch = _Watch(progress)
        try:
            return run_notebook(
                notebook,
                on_output=watch.output,
                on_cell_start=watch.cell_started,
                on_cell_end=watch.cell_ended,
                **arguments,
            )
        finally:
            watch.flush()


def _report(outcome: NotebookRun) -> None:
    where = f" -> {outcome.output}" if outcome.output else ""
    ran = sum(cell.status not in ("skipped",) for cell in outcome.cells)
    summary = f"session {outcome.session}: {ran} cells ran{where}"
    stopped = outcome.stopped_at
    if stopped is None:
        terminal.print(f"[green]completed[/green] {escape(summary)}", highlight=False)
        return
    error = stopped.result.error if stopped.result else None
    total = len(outcome.notebook.cells)
    place = f"cell {stopped.index + 1} of {total} (In [{stopped.execution_count}])"
    if outcome.status == "exited":
        terminal.print(
            f"[yellow]exited[/yellow] at {place} ({escape(str(error))}); "
            f"{escape(summary)}",
            highlight=False,
        )
        return
    if error is not None and error.traceback:
        terminal.print(
            error.traceback.rstrip(), style="red", markup=False, highlight=False
        )
    terminal.print(
        f"[red]failed[/red] at {place}: {escape(str(error))}; {escape(summary)}",
        highlight=False,
    )
