"""The ``jobrunner notebook`` commands: run a notebook cell by cell as steps,
now or on a schedule in a Kubernetes cluster.

Exit codes follow the ``jobrunner`` command's: 0 when the notebook ran to its
end (or a cell ended it with ``sys.exit(0)``), 1 when a cell stopped it with an
error, 2 for bad usage or bad input, 3 for a failure of jobrunner, its store or
its backend.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from jobrunner import cli_backend
from jobrunner.cli_common import (
    EXIT_FAILED,
    JsonOption,
    LiveOutput,
    StoreOption,
    StoreOptions,
    console,
    errors,
    errors_reported,
    fail,
    store_options,
)
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

EXIT_CELL_FAILED = EXIT_FAILED

notebook_app = typer.Typer(
    help="Run notebooks cell by cell, each code cell a step of one session.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)
# Everything but the notebook itself goes to stderr, so that `--output -` can
# write the notebook to stdout.
terminal = errors


ParameterOption = Annotated[
    list[str] | None,
    typer.Option(
        "--parameter",
        "-p",
        metavar="NAME=VALUE",
        help="A parameter; the value is YAML: 3, 0.5, true, null, text.",
    ),
]
ParametersFileOption = Annotated[
    str | None,
    typer.Option("--parameters-file", "-f", help="A YAML or JSON file of parameters."),
]
TimeoutOption = Annotated[
    float | None, typer.Option("--timeout", help="Stop a cell after this many seconds.")
]


def _parameters(pairs: list[str] | None, file: str | None) -> dict[str, Any]:
    parameters = read_parameters(file) if file else {}
    parameters.update(parse_parameter(text) for text in pairs or [])
    return parameters


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
        self.output = LiveOutput(self._print)

    def cell_started(self, cell: CellStart) -> None:
        first = cell.source.strip().splitlines()[0] if cell.source.strip() else ""
        self.progress.update(
            self.task,
            total=cell.total,
            completed=cell.number - 1,
            description=f"cell {cell.index + 1}: {escape(first[:40])}",
        )

    def cell_ended(self, cell: CellRun) -> None:
        self.output.flush()
        if cell.status != "skipped":
            self.progress.advance(self.task)

    def _print(self, stream: str, line: str) -> None:
        style = "red" if stream == "stderr" else None
        self.progress.console.print(
            line, style=style, markup=False, highlight=False, soft_wrap=True
        )


@notebook_app.command("run")
@cli_backend.backend_options
def run(
    notebook: Annotated[
        str, typer.Argument(help="The notebook: .ipynb or a percent-format .py.")
    ],
    parameter: ParameterOption = None,
    parameters_file: ParametersFileOption = None,
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
    timeout: TimeoutOption = None,
    store: StoreOption = None,
    store_option: StoreOptions = None,
    *,
    backend: cli_backend.BackendChoice,
) -> None:
    """Run a notebook's cells in order, each as one step of a session."""
    to_stdout = output == "-"
    if to_stdout and resume:
        fail("--resume needs the notebook of the run in a file: --output PATH", 2)
    target = None if to_stdout else output or _default_output(notebook)
    with errors_reported():
        parameters = _parameters(parameter, parameters_file)
        outcome = _run_watched(
            notebook,
            parameters=parameters if parameters or not resume else None,
            session=session,
            output=target,
            resume=resume,
            store=store,
            store_options=store_options(store_option),
            backend=cli_backend.make_backend(backend),
            timeout=timeout,
        )
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
            watch.output.flush()


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


# Scheduled notebooks: a CronJob whose pod runs the notebook's driver.

_CLUSTER = "Cluster"
NameArgument = Annotated[str, typer.Argument(help="The schedule's name.")]


def _api(kubeconfig: str | None, context: str | None) -> Any:
    from jobrunner.backends.kubernetes import make_api_client

    return make_api_client(kubeconfig, context)


@notebook_app.command("schedule")
@cli_backend.cluster_options
def schedule(
    notebook: Annotated[
        str, typer.Argument(help="The notebook: .ipynb or a percent-format .py.")
    ],
    cron: Annotated[
        str,
        typer.Option(
            "--cron", help='When to run, five cron fields: "0 2 * * *" is 02:00 daily.'
        ),
    ],
    parameter: ParameterOption = None,
    parameters_file: ParametersFileOption = None,
    name: Annotated[
        str | None,
        typer.Option(
            "--name", help="The schedule's name.", show_default="from NOTEBOOK"
        ),
    ] = None,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run", help="Print the CronJob as YAML; create and upload nothing."
        ),
    ] = False,
    driver_image: Annotated[
        str | None,
        typer.Option(
            "--driver-image",
            envvar="JOBRUNNER_DRIVER_IMAGE",
            help="The driver's image: jobrunner installed with pip (not the step"
            " image). Required.",
            rich_help_panel=_CLUSTER,
        ),
    ] = None,
    driver_service_account: Annotated[
        str,
        typer.Option(
            "--driver-service-account",
            help="The driver pod's ServiceAccount (it creates the cells' Jobs).",
            rich_help_panel=_CLUSTER,
        ),
    ] = "jobrunner-driver",
    zone: Annotated[
        str | None,
        typer.Option(
            "--timezone", help="The cron's IANA time zone.", rich_help_panel=_CLUSTER
        ),
    ] = None,
    timeout: TimeoutOption = None,
    store: StoreOption = None,
    store_option: StoreOptions = None,
    *,
    backend: cli_backend.BackendChoice,
) -> None:
    """Run a notebook on a schedule: a CronJob whose run runs each cell as a Job.

    The notebook and its parameters are uploaded to the store; each run writes
    its executed notebook to schedules/NAME/runs/ in the store.
    """
    from jobrunner.schedule import (
        NotebookSchedule,
        default_schedule_name,
        manifest_yaml,
        schedule_notebook,
    )
    from jobrunner.store import CheckpointStore

    with errors_reported():
        options = store_options(store_option)
        plan = NotebookSchedule(
            name=default_schedule_name(notebook) if name is None else name,
            cron=cron,
            notebook=notebook,
            # A local folder is given to the driver as an absolute path.
            store=CheckpointStore(store, options=options).files.url,
            driver_image=driver_image or "",
            steps=cli_backend.kubernetes_options(backend),
            store_options=options,
            driver_service_account=driver_service_account,
            timezone=zone,
            cell_timeout=timeout,
        )
        parameters = _parameters(parameter, parameters_file)
        api = None if dry_run else _api(backend.kubeconfig, backend.context)
        cronjob = schedule_notebook(plan, api, parameters=parameters, dry_run=dry_run)
    if dry_run:
        sys.stdout.write(manifest_yaml(cronjob))
        return
    terminal.print(
        f"[green]scheduled[/green] {escape(plan.name)} ({escape(plan.cron)}):"
        f" CronJob {escape(plan.namespace)}/{escape(plan.name)}; runs write to"
        f" {escape(plan.store)}/schedules/{escape(plan.name)}/runs/",
        highlight=False,
    )


@notebook_app.command("schedules")
def schedules(
    namespace: cli_backend.Namespace = "default",
    kubeconfig: cli_backend.Kubeconfig = None,
    context: cli_backend.Context = None,
    as_json: JsonOption = False,
) -> None:
    """List the scheduled notebooks of a namespace."""
    from jobrunner.schedule import list_schedules

    with errors_reported():
        found = list_schedules(_api(kubeconfig, context), namespace)
    if as_json:
        sys.stdout.write(json.dumps([s.to_dict() for s in found], indent=2) + "\n")
        return
    table = Table(title=f"notebook schedules in {namespace}")
    for column in ("name", "cron", "notebook", "last schedule", "suspended"):
        table.add_column(column, overflow="fold")
    for item in found:
        cron = f"{item.cron} ({item.timezone})" if item.timezone else item.cron
        last = item.last_schedule.isoformat() if item.last_schedule else "-"
        table.add_row(
            escape(item.name),
            escape(cron),
            escape(item.notebook),
            last,
            "[yellow]yes[/yellow]" if item.suspended else "no",
        )
    console.print(table)


@notebook_app.command("unschedule")
def unschedule(
    name: NameArgument,
    namespace: cli_backend.Namespace = "default",
    kubeconfig: cli_backend.Kubeconfig = None,
    context: cli_backend.Context = None,
) -> None:
    """Delete a schedule's CronJob and its Jobs; its runs stay in the store."""
    from jobrunner.schedule import delete_schedule

    with errors_reported():
        delete_schedule(_api(kubeconfig, context), name, namespace)
    terminal.print(
        f"[green]unscheduled[/green] {escape(name)}: deleted the CronJob"
        f" {escape(namespace)}/{escape(name)} and its Jobs; the notebook and its"
        " runs stay in the store",
        highlight=False,
    )


@notebook_app.command("drive", hidden=True)
@cli_backend.backend_options
def drive(
    schedule_name: Annotated[
        str, typer.Option("--schedule", help="The schedule to run once.")
    ],
    timeout: TimeoutOption = None,
    store: StoreOption = None,
    store_option: StoreOptions = None,
    *,
    backend: cli_backend.BackendChoice,
) -> None:
    """Run one run of a scheduled notebook: what the CronJob's pod runs."""
    from jobrunner.schedule import run_scheduled_notebook
    from jobrunner.store import CheckpointStore

    # The driver's log is all a pod leaves: a line per Job and per cell.
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    with errors_reported():
        outcome = run_scheduled_notebook(
            CheckpointStore(store, options=store_options(store_option)),
            schedule_name,
            cli_backend.make_backend(backend),
            timeout=timeout,
            on_output=_write_through,
        )
    _report(outcome)
    raise typer.Exit(0 if outcome.ok else EXIT_CELL_FAILED)


def _write_through(stream: str, text: str) -> None:
    target = sys.stderr if stream == "stderr" else sys.stdout
    target.write(text)
    target.flush()
