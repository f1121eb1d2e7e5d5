"""What every ``jobrunner`` command shares: exit codes, the terminal, the store
options, and how jobrunner's errors reach the user."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape

from jobrunner.errors import InvalidInput, JobRunnerError
from jobrunner.store import CheckpointStore

__all__ = [
    "EXIT_FAILED",
    "EXIT_JOBRUNNER",
    "EXIT_USAGE",
    "JsonOption",
    "LiveOutput",
    "StoreOption",
    "StoreOptions",
    "console",
    "errors",
    "errors_reported",
    "fail",
    "open_store",
    "print_json",
    "store_options",
]

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_JOBRUNNER = 3

console = Console()
errors = Console(stderr=True)

StoreOption = Annotated[
    str | None,
    typer.Option(
        "--store",
        envvar="JOBRUNNER_STORE",
        help="Checkpoint store: a folder or an fsspec URL such as s3://bucket/prefix.",
        show_default="./checkpoints",
    ),
]
StoreOptions = Annotated[
    list[str] | None,
    typer.Option(
        "--store-option",
        metavar="KEY=VALUE",
        help="An option of the store's filesystem, e.g. endpoint_url=http://...",
    ),
]
JsonOption = Annotated[
    bool, typer.Option("--json", help="Print machine-readable JSON instead.")
]


def fail(message: str, code: int) -> NoReturn:
    """Print one red line and exit with ``code``."""
    errors.print(f"[red]error:[/red] {escape(message)}", highlight=False)
    raise typer.Exit(code)


@contextmanager
def errors_reported() -> Iterator[None]:
    """Turn jobrunner's errors into one red line and the documented exit code."""
    try:
        yield
    except InvalidInput as error:
        fail(str(error), EXIT_USAGE)
    except JobRunnerError as error:
        fail(str(error), EXIT_JOBRUNNER)


def store_options(pairs: list[str] | None) -> dict[str, Any]:
    """Parse ``--store-option KEY=VALUE`` pairs; values are JSON when they parse."""
    options: dict[str, Any] = {}
    for pair in pairs or []:
        key, separator, value = pair.partition("=")
        if not separator or not key:
            fail(f"--store-option expects KEY=VALUE, got {pair!r}", EXIT_USAGE)
        try:
            options[key] = json.loads(value)
        except ValueError:
            options[key] = value
    return options


def open_store(url: str | None, pairs: list[str] | None) -> CheckpointStore:
    """Open the store the ``--store`` and ``--store-option`` options name."""
    return CheckpointStore(url, options=store_options(pairs))


def print_json(data: Any) -> None:
    """Print machine-readable output on stdout."""
    sys.stdout.write(json.dumps(data, indent=2) + "\n")


class LiveOutput:
    """Prints a step's output as it arrives, whole lines at a time.

    Args:
        show: Prints one line of a stream (``stdout`` or ``stderr``).
    """

    def __init__(self, show: Callable[[str, str], None]) -> None:
        self.show = show
        self.pending = {"stdout": "", "stderr": ""}

    def __call__(self, stream: str, text: str) -> None:
        lines = (self.pending[stream] + text).split("\n")
        self.pending[stream] = lines.pop()
        for line in lines:
            self.show(stream, line)

    def flush(self) -> None:
        """Print what is left of an unfinished line."""
        for stream, text in self.pending.items():
            if text:
                self.show(stream, text)
        self.pending = {"stdout": "", "stderr": ""}
