"""The ``jobrunner`` command: submit steps and inspect sessions from a terminal.

Exit codes: 0 when the step succeeded (or the command did its work), 1 when the
user's code failed or timed out or a confirmation was declined, 2 for bad usage
or bad input, 3 for a failure of jobrunner, its store or its backend (a conflict
or a killed step included).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from jobrunner import cli_backend
from jobrunner.cli_common import (
    EXIT_JOBRUNNER,
    EXIT_USAGE,
    JsonOption,
    LiveOutput,
    StoreOption,
    StoreOptions,
    console,
    errors,
    errors_reported,
    fail,
    open_store,
    print_json,
)
from jobrunner.cli_notebook import notebook_app
from jobrunner.result import StepResult
from jobrunner.session import Session, delete_session, gc, list_sessions
from jobrunner.store import DEFAULT_GRACE, GcReport, StepDiff

__all__ = ["app", "main"]

_EXIT_BY_STATUS = {"ok": 0, "error": 1, "timeout": 1, "conflict": 3, "killed": 3}

app = typer.Typer(
    name="jobrunner",
    help="A REPL-like Python session in which every step runs in a fresh process.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    add_completion=False,
)


def _read_code(code: str | None, file: str | None) -> str | bytes:
    if code is not None and file is not None:
        fail("give the code as an argument or with --file, not both", EXIT_USAGE)
    if file is not None:
        try:
            with open(file, "rb") as stream:
                return stream.read()
        except OSError as error:
            fail(f"cannot read {file}: {error.strerror}", EXIT_USAGE)
    if code == "-":
        return sys.stdin.buffer.read()
    if code is None:
        fail("no code: give it as an argument, with --file FILE, or - for stdin", 2)
    return code


def _show_line(stream: str, line: str) -> None:
    target = errors if stream == "stderr" else console
    target.print(line, markup=False, highlight=False, soft_wrap=True)


@app.command()
@cli_backend.backend_options
def run(
    code: Annotated[
        str | None, typer.Argument(help="The step's code, or - to read it from stdin.")
    ] = None,
    session: Annotated[str, typer.Option("--session", "-s", help="Session id.")] = "",
    file: Annotated[
        str | None, typer.Option("--file", "-f", help="Read the code from a file.")
    ] = None,
    timeout: Annotated[
        float | None, typer.Option(help="Stop the step after this many seconds.")
    ] = None,
    retry_conflicts: Annotated[
        int, typer.Option(help="Run again this many times if another step wins.")
    ] = 0,
    store: StoreOption = None,
    store_option: StoreOptions = None,
    as_json: JsonOption = False,
    *,
    backend: cli_backend.BackendChoice,
) -> None:
    """Run one step of a session and show its output and value."""
    if not session:
        fail("a session id is required: --session ID (or -s ID)", EXIT_USAGE)
    source = _read_code(code, file)
    with errors_reported():
        runner = Session(
            session,
            store=open_store(store, store_option),
            backend=cli_backend.make_backend(backend),
        )
        if as_json:
            result = runner.run(
                source, timeout=timeout, retry_on_conflict=retry_conflicts
            )
            print_json(result.to_dict())
        else:
            result = _run_live(
                lambda on_output: runner.run(
                    source,
                    timeout=timeout,
                    retry_on_conflict=retry_conflicts,
                    on_output=on_output,
                )
            )
            _show_outcome(result)
    raise typer.Exit(_EXIT_BY_STATUS.get(result.status, EXIT_JOBRUNNER))


def _run_live(start: Callable[[Any], StepResult]) -> StepResult:
    live = LiveOutput(_show_line)
    with errors.status("running the step...", spinner="dots"):
        try:
            return start(live)
        except KeyboardInterrupt:
            live.flush()
            fail("interrupted: the step was stopped and the session is unchanged", 130)
        finally:
            live.flush()


def _show_outcome(result: StepResult) -> None:
    if result.value is not None:
        console.print(result.value, markup=False, highlight=False, soft_wrap=True)
    if result.error is not None:
        text = result.error.traceback or str(result.error)
        errors.print(text.rstrip(), style="red", markup=False, highlight=False)
    for name, reason in result.dropped.items():
        errors.print(f"[yellow]not saved:[/yellow] {escape(name)}: {escape(reason)}")
    if result.step is not None:
        summary = _names_summary(result)
        errors.print(
            f"[dim]step {result.step} committed{summary}[/dim]", highlight=False
        )
    elif result.status != "error":
        errors.print(f"[red]{result.status}:[/red] the session is unchanged")


def _names_summary(result: StepResult) -> str:
    parts = [
        f"{label} {', '.join(names)}"
        for label, names in (
            ("created", result.created),
            ("changed", result.changed),
            ("deleted", result.deleted),
        )
        if names
    ]
    return f" ({'; '.join(parts)})" if parts else ""


def _short(code: str, width: int = 48) -> str:
    line = " ⏎ ".join(
        part.strip() for part in code.strip().splitlines() if part.strip()
    )
    return line if len(line) <= width else line[: width - 1] + "…"


@app.command()
def history(
    session: Annotated[str, typer.Argument(help="Session id.")],
    last: Annotated[
        int | None, typer.Option(help="Show only the most recent N steps.")
    ] = None,
    store: StoreOption = None,
    store_option: StoreOptions = None,
    as_json: JsonOption = False,
) -> None:
    """List every step of a session, failed ones included."""
    with errors_reported():
        results = Session(session, store=open_store(store, store_option)).history(last)
    if as_json:
        print_json([result.to_dict() for result in results])
        return
    table = Table(title=f"session {session}")
    columns = ("step", "status", "code", "names changed", "written", "time")
    for column in (*columns, "started"):
        # Headers stay whole on a narrow terminal; the cells fold instead.
        table.add_column(column, overflow="fold", min_width=len(column))
    for result in results:
        timings = result.timings
        table.add_row(
            str(result.step) if result.step is not None else "-",
            _status_text(result.status),
            escape(_short(result.code)),
            escape(", ".join((*result.created, *result.changed, *result.deleted))),
            _bytes(result.bytes_written) if result.step is not None else "-",
            f"{timings.load + timings.execute + timings.save:.3f}s",
            result.started,
        )
    console.print(table)


def _status_text(status: str) -> str:
    return "[green]ok[/green]" if status == "ok" else f"[red]{status}[/red]"


@app.command()
def show(
    session: Annotated[str, typer.Argument(help="Session id.")],
    step: Annotated[int, typer.Argument(help="The committed step's number.")],
    store: StoreOption = None,
    store_option: StoreOptions = None,
    as_json: JsonOption = False,
) -> None:
    """Print the result of one committed step."""
    with errors_reported():
        checkpoints = open_store(store, store_option)
        checkpoints.require(session)
        manifest = checkpoints.manifest(session, step)
        result = checkpoints.attempt(session, manifest.result["attempt"])
        result = result or StepResult.from_dict(manifest.result)
    if as_json:
        print_json(result.to_dict())
        return
    errors.print(f"[bold]step {step}[/bold] [dim]{result.started}[/dim]")
    console.print(result.code, markup=False, highlight=False)
    if result.stdout:
        console.print(result.stdout.rstrip("\n"), markup=False, highlight=False)
    _show_outcome(result)
    timings = result.timings
    errors.print(
        f"[dim]wrote {_bytes(result.bytes_written)}; load {timings.load:.3f}s,"
        f" run {timings.execute:.3f}s, save {timings.save:.3f}s[/dim]",
        highlight=False,
    )


@app.command(name="vars")
def variables(
    session: Annotated[str, typer.Argument(help="Session id.")],
    step: Annotated[
        int | None, typer.Option(help="A committed step (default: the last).")
    ] = None,
    store: StoreOption = None,
    store_option: StoreOptions = None,
    as_json: JsonOption = False,
) -> None:
    """List a session's variables: name, type and size. Nothing is unpickled."""
    with errors_reported():
        found = Session(session, store=open_store(store, store_option)).variables(step)
    if as_json:
        print_json(
            [
                {"name": v.name, "type": v.type, "size": v.size, "kind": v.kind}
                for v in found
            ]
        )
        return
    table = Table(title=f"session {session}")
    table.add_column("name")
    table.add_column("type")
    table.add_column("size", justify="right")
    for variable in found:
        size = "-" if variable.kind == "module" else _bytes(variable.size)
        table.add_row(escape(variable.name), escape(variable.type), size)
    console.print(table)


def _bytes(size: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024  # type: ignore[assignment]
    raise AssertionError("unreachable")


@app.command()
def sessions(
    store: StoreOption = None,
    store_option: StoreOptions = None,
    as_json: JsonOption = False,
) -> None:
    """List the sessions in the store."""
    with errors_reported():
        checkpoints = open_store(store, store_option)
        found = [(name, checkpoints.head(name)) for name in list_sessions(checkpoints)]
    if as_json:
        print_json([{"session": name, "step": step} for name, step in found])
        return
    table = Table(title=f"sessions in {checkpoints.url}")
    table.add_column("session")
    table.add_column("last step", justify="right")
    for name, step in found:
        table.add_row(escape(name), str(step))
    console.print(table)


@app.command()
def diff(
    session: Annotated[str, typer.Argument(help="Session id.")],
    before: Annotated[int, typer.Argument(help="The earlier committed step.")],
    after: Annotated[int, typer.Argument(help="The later committed step.")],
    store: StoreOption = None,
    store_option: StoreOptions = None,
    as_json: JsonOption = False,
) -> None:
    """List the names added, removed and changed between two committed steps.

    Only the steps' manifests are compared; nothing is unpickled.
    """
    with errors_reported():
        found = Session(session, store=open_store(store, store_option)).diff(
            before, after
        )
    if as_json:
        print_json(found.to_dict())
        return
    _show_diff(found)


def _show_diff(found: StepDiff) -> None:
    if not found.changes:
        errors.print(
            f"[dim]steps {found.before} and {found.after} hold the same names"
            " and values[/dim]",
            highlight=False,
        )
        return
    table = Table(
        title=f"session {found.session}: step {found.before} -> {found.after}"
    )
    for column in ("name", "change", "before", "after"):
        table.add_column(column, overflow="fold")
    styles = {"added": "green", "removed": "red", "changed": "yellow"}
    for entry in found.changes:
        table.add_row(
            escape(entry.name),
            f"[{styles[entry.change]}]{entry.change}[/]",
            escape(entry.before or "-"),
            escape(entry.after or "-"),
        )
    console.print(table)


def _show_copy(result: StepResult, what: str) -> None:
    summary = _names_summary(result)
    errors.print(
        f"[dim]step {result.step} of session {escape(result.session)} committed:"
        f" {escape(what)}{summary}[/dim]",
        highlight=False,
    )


@app.command()
def rollback(
    session: Annotated[str, typer.Argument(help="Session id.")],
    step: Annotated[int, typer.Argument(help="The committed step to return to.")],
    store: StoreOption = None,
    store_option: StoreOptions = None,
    as_json: JsonOption = False,
) -> None:
    """Make an earlier step's state current again, as a new step.

    History is kept: the rollback is the session's next step.
    """
    with errors_reported():
        result = Session(session, store=open_store(store, store_option)).rollback(step)
    if as_json:
        print_json(result.to_dict())
        return
    _show_copy(result, f"rolled back to step {step}")


@app.command()
def fork(
    source: Annotated[
        str, typer.Argument(help="The session to fork, as ID or ID@STEP.")
    ],
    new: Annotated[str, typer.Argument(help="The new session's id.")],
    store: StoreOption = None,
    store_option: StoreOptions = None,
    as_json: JsonOption = False,
) -> None:
    """Start a new session from another's state at a step (default: its last).

    No blob is copied: the two sessions share them.
    """
    session, _, step_text = source.partition("@")
    if step_text and not step_text.isdigit():
        fail(f"expected ID or ID@STEP with a step number, got {source!r}", EXIT_USAGE)
    step = int(step_text) if step_text else None
    with errors_reported():
        forked = Session(session, store=open_store(store, store_option)).fork(new, step)
        result = forked.history()[0]
    if as_json:
        print_json(result.to_dict())
        return
    _show_copy(result, result.code.removeprefix("# "))


def _seconds(text: str | None, option: str) -> float | None:
    """Parse an age such as 90, 90s, 30m, 12h, 7d or 2w into seconds."""
    if text is None:
        return None
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
    number, unit = (text[:-1], text[-1]) if text[-1:] in units else (text, "s")
    try:
        value = float(number)
    except ValueError:
        value = -1.0
    if not value >= 0:
        fail(
            f"{option} expects an age such as 90s, 30m, 12h, 7d or 2w, got {text!r}",
            EXIT_USAGE,
        )
    return value * units[unit]


GraceOption = Annotated[
    str,
    typer.Option(
        "--grace",
        help="Keep unreferenced blobs younger than this: a running step may be"
        " about to commit them.",
    ),
]


@app.command(name="gc")
def collect_garbage(
    keep_last: Annotated[
        int | None,
        typer.Option(help="Keep each session's last N steps (at least 1).", min=1),
    ] = None,
    older_than: Annotated[
        str | None,
        typer.Option(help="Remove only steps older than this age: 30m, 12h, 7d."),
    ] = None,
    grace: GraceOption = f"{DEFAULT_GRACE:g}s",
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Show what would go; remove nothing.")
    ] = False,
    store: StoreOption = None,
    store_option: StoreOptions = None,
    as_json: JsonOption = False,
) -> None:
    """Remove old steps, then the blobs that no session's steps still use.

    Each session's last step always stays. Without --keep-last or --older-than
    no step is removed: only blobs that no step lists go.
    """
    age = _seconds(older_than, "--older-than")
    grace_seconds = _seconds(grace, "--grace")
    assert grace_seconds is not None
    with errors_reported():
        report = gc(
            open_store(store, store_option),
            keep_last=keep_last,
            older_than=age,
            grace=grace_seconds,
            dry_run=dry_run,
        )
    _show_report(report, as_json)


@app.command()
def delete(
    session: Annotated[str, typer.Argument(help="Session id.")],
    yes: Annotated[
        bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")
    ] = False,
    grace: GraceOption = f"{DEFAULT_GRACE:g}s",
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Show what would go; remove nothing.")
    ] = False,
    store: StoreOption = None,
    store_option: StoreOptions = None,
    as_json: JsonOption = False,
) -> None:
    """Delete a session's whole history, then the blobs no other session uses."""
    grace_seconds = _seconds(grace, "--grace")
    assert grace_seconds is not None
    with errors_reported():
        checkpoints = open_store(store, store_option)
        checkpoints.require(session)
        if not (yes or dry_run):
            typer.confirm(
                f"Delete session {session} and its whole history?", abort=True
            )
        report = delete_session(
            session, checkpoints, grace=grace_seconds, dry_run=dry_run
        )
    _show_report(report, as_json)


def _show_report(report: GcReport, as_json: bool) -> None:
    if as_json:
        print_json(report.to_dict())
        return
    verb = "would remove" if report.dry_run else "removed"
    if report.steps_removed:
        table = Table(title=f"steps {verb}")
        table.add_column("session")
        table.add_column("steps", justify="right")
        table.add_column("numbers", overflow="fold")
        for name, steps in report.steps_removed.items():
            table.add_row(escape(name), str(len(steps)), _ranges(steps))
        console.print(table)
    for name in report.sessions_deleted:
        console.print(f"session {escape(name)}: {verb} its folder", highlight=False)
    console.print(
        f"{verb} {report.blobs_removed} blobs ({_bytes(report.bytes_freed)}) and"
        f" {report.attempts_removed} attempt records; kept {report.blobs_kept}"
        f" blobs in use and {report.blobs_in_grace} too recent to remove",
        highlight=False,
    )


def _ranges(steps: list[int]) -> str:
    """Write step numbers as ranges: 1-4, 7."""
    parts: list[str] = []
    start = previous = steps[0]
    for step in [*steps[1:], None]:
        if step is not None and step == previous + 1:
            previous = step
            continue
        parts.append(str(start) if start == previous else f"{start}-{previous}")
        if step is not None:
            start = previous = step
    return ", ".join(parts)


app.add_typer(notebook_app, name="notebook")


def main() -> None:
    """Run the command line interface."""
    app()


if __name__ == "__main__":
    main()
