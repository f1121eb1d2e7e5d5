"""Batch notebooks: run a notebook cell by cell, each code cell a step of one session.

The notebook is a Jupyter notebook (``.ipynb``, nbformat 4) or a percent-format
Python script (``# %%`` cells, as jupytext writes them). Every code cell runs as
one step of a :class:`~jobrunner.session.Session`, so it runs in a fresh process
on any backend, and the namespace it leaves is a checkpoint. The executed
notebook is written after every cell, so a run that stops half way leaves a
readable notebook, and ``resume=True`` continues it without running again the
cells that already committed.

Conventions follow papermill and nbclient:

- Parameters are injected as a new cell tagged ``injected-parameters`` after the
  cell tagged ``parameters``, or at the top when there is none.
- A cell tagged ``raises-exception`` may raise: its error is recorded and the run
  goes on. A cell tagged ``skip-execution`` and an empty cell are not run.
- Any other error stops the run: the run's status is ``failed`` and the cells
  after it are left as they were. ``sys.exit()``, ``sys.exit(0)`` and ``raise
  SystemExit`` stop the run too, but cleanly (status ``exited``), as papermill
  treats them.

What the output notebook records:

- ``metadata.jobrunner`` of the notebook: ``session``, ``input``,
  ``parameters``, ``base_step`` (the session's last step before the first cell
  ran), ``status`` (``running``, ``completed``, ``failed`` or ``exited``),
  ``started``, ``ended`` and, when a cell stopped the run, ``stopped_at`` (that
  cell's index) and ``error``.
- ``metadata.jobrunner`` of every code cell this run reached: ``status`` (``ok``,
  ``error`` for a tolerated error, ``skipped``, ``failed`` or ``exited``), ``step``
  (the step it committed, or null), ``attempt`` and ``duration`` in seconds.
- ``metadata.execution`` of every code cell that ran: the timestamps nbclient
  records (``iopub.status.busy`` and ``iopub.execute_input`` when the cell
  started, ``shell.execute_reply`` and ``iopub.status.idle`` when it ended), so
  that Jupyter's tools show the cell's timing.

Resuming: the cells whose status is ``ok``, ``error`` or ``skipped`` are done and
are not run again (a tolerated error committed nothing, and the cells after it ran
on the state without it, which is what the session holds); the run continues
from the first other cell. A cell that failed or was interrupted committed
nothing, so it runs again, with its code as the input notebook has it now: a bug
can be fixed before resuming, but a done cell must be unchanged.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import tempfile
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import PurePosixPath
from typing import Any

import nbformat
import yaml
from nbformat import NotebookNode

from jobrunner.backends.base import Backend, OutputCallback
from jobrunner.errors import InvalidInput
from jobrunner.result import StepResult
from jobrunner.session import Session
from jobrunner.store import CheckpointStore

__all__ = [
    "CellRun",
    "CellStart",
    "NotebookRun",
    "default_session_id",
    "inject_parameters",
    "notebook_text",
    "parse_parameter",
    "read_notebook",
    "read_parameters",
    "read_percent_script",
    "run_notebook",
    "write_notebook",
    "write_parameters",
]

logger = logging.getLogger(__name__)

# nbformat's functions have no annotations: they are called through Any.
_nbformat: Any = nbformat
_v4: Any = nbformat.v4

PARAMETERS_TAG = "parameters"
INJECTED_TAG = "injected-parameters"
RAISES_TAG = "raises-exception"
SKIP_TAG = "skip-execution"

# Cell statuses after which a resumed run does not run the cell again.
_DONE = ("ok", "error", "skipped")
# Values of SystemExit that end a run cleanly, as papermill treats them.
_CLEAN_EXITS = ("", "0", "None")
_MAX_ID = 63
_SUFFIX = 6


@dataclass(frozen=True)
class CellStart:
    """A code cell about to run.

    Attributes:
        index: The cell's index in the notebook.
        number: Its position among the cells this run executes, from 1.
        total: How many cells this run executes.
        source: The cell's code.
    """

    index: int
    number: int
    total: int
    source: str


@dataclass(frozen=True)
class CellRun:
    """The outcome of one code cell of this run.

    Attributes:
        index: The cell's index in the notebook.
        status: ``ok`` (committed), ``error`` (raised, and its
            ``raises-exception`` tag let the run go on), ``skipped``, ``failed``
            (stopped the run) or ``exited`` (``SystemExit`` with code 0 or none).
        execution_count: The cell's ``In [n]`` number, or None if it did not run.
        result: The step's result, or None if the cell did not run.
    """

    index: int
    status: str
    execution_count: int | None = None
    result: StepResult | None = None


@dataclass
class NotebookRun:
    """The outcome of running a notebook.

    Attributes:
        notebook: The executed notebook, outputs and metadata included.
        session: The id of the session the cells ran in.
        status: ``completed``, ``failed`` (a cell stopped the run) or ``exited``
            (a cell called ``sys.exit()`` or ``sys.exit(0)``).
        output: Where the notebook was written, or None.
        cells: The code cells this run reached, in order (done cells of a
            resumed run are not included).
        resumed_at: The index of the first cell this run executed when it
            resumed an earlier run, else None.
    """

    notebook: NotebookNode
    session: str
    status: str
    output: str | None = None
    cells: list[CellRun] = field(default_factory=list)
    resumed_at: int | None = None

    @property
    def ok(self) -> bool:
        """True unless a cell stopped the run with an error."""
        return self.status != "failed"

    @property
    def stopped_at(self) -> CellRun | None:
        """The cell that stopped the run, if one did."""
        last = self.cells[-1] if self.cells else None
        return last if last and last.status in ("failed", "exited") else None


# Reading notebooks


def read_notebook(
    path: str, storage_options: dict[str, Any] | None = None
) -> NotebookNode:
    """Read a notebook: ``.ipynb`` (nbformat 4) or a percent-format ``.py`` script.

    Args:
        path: A local path or an fsspec URL.
        storage_options: Options of the URL's fsspec filesystem.

    Raises:
        InvalidInput: The file cannot be read or is not a notebook.
    """
    text = _read_text(path, storage_options)
    if path.endswith(".py"):
        return read_percent_script(text)
    try:
        notebook: NotebookNode = _nbformat.reads(text, as_version=4)
    except Exception as error:
        raise InvalidInput(f"{path} is not a Jupyter notebook: {error}") from error
    _check_language(notebook, path)
    return notebook


def _read_text(path: str, storage_options: dict[str, Any] | None = None) -> str:
    try:
        with _open(path, "r", storage_options) as stream:
            return str(stream.read())
    except (OSError, UnicodeDecodeError) as error:
        raise InvalidInput(f"cannot read the notebook {path}: {error}") from error


@contextlib.contextmanager
def _open(
    path: str, mode: str, storage_options: dict[str, Any] | None = None
) -> Iterator[Any]:
    if "://" not in path:
        with open(path, mode, encoding="utf-8") as stream:
            yield stream
        return
    import fsspec

    options = storage_options or {}
    with fsspec.open(path, mode, encoding="utf-8", **options) as stream:
        yield stream


def _check_language(notebook: NotebookNode, path: str) -> None:
    metadata = notebook.get("metadata", {})
    language = metadata.get("kernelspec", {}).get("language") or metadata.get(
        "language_info", {}
    ).get("name")
    if language and language.lower() != "python":
        raise InvalidInput(f"{path} is a {language} notebook; jobrunner runs Python")


_CELL_MARKER = re.compile(r"^# %%(?!%)(.*)$")
_CELL_TYPE = re.compile(r"\[(markdown|md|raw)\]")
_OPTION = re.compile(r"([A-Za-z_][\w.-]*)=")


def read_percent_script(text: str) -> NotebookNode:
    """Read a percent-format script (``# %%`` cells) as a notebook.

    ``# %% [markdown]`` starts a markdown cell whose lines are comments,
    ``# %% [raw]`` a raw cell, and options after the marker are JSON values, as
    jupytext writes them: ``# %% tags=["parameters"]``. A jupytext header (a
    commented YAML block between ``# ---`` lines) is skipped.

    Raises:
        InvalidInput: An option after a cell marker is not ``key=JSON``.
    """
    lines = _without_header(text.splitlines())
    cells: list[NotebookNode] = []
    kind, body = "code", []
    metadata: dict[str, Any] = {}
    for line in lines:
        marker = _CELL_MARKER.match(line)
        if marker is None:
            body.append(line)
            continue
        if cells or _strip_blank(body):
            cells.append(_percent_cell(kind, metadata, body))
        kind, metadata = _marker_options(marker.group(1))
        body = []
    if cells or _strip_blank(body):
        cells.append(_percent_cell(kind, metadata, body))
    notebook: NotebookNode = _v4.new_notebook(cells=cells)
    notebook.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    return notebook


def _without_header(lines: list[str]) -> list[str]:
    if not lines or lines[0].strip() != "# ---":
        return lines
    for number, line in enumerate(lines[1:], start=1):
        if line.strip() == "# ---":
            return lines[number + 1 :]
        if not line.startswith("#"):
            break
    return lines


def _marker_options(rest: str) -> tuple[str, dict[str, Any]]:
    kind = "code"
    found = _CELL_TYPE.search(rest)
    if found:
        kind = "raw" if found.group(1) == "raw" else "markdown"
        rest = rest[: found.start()] + rest[found.end() :]
    metadata: dict[str, Any] = {}
    decoder = json.JSONDecoder()
    position = 0
    while (option := _OPTION.search(rest, position)) is not None:
        try:
            value, position = decoder.raw_decode(rest, option.end())
        except ValueError as error:
            raise InvalidInput(
                f"the cell marker '# %%{rest}' has an option that is not"
                f" key=JSON: {option.group(1)}"
            ) from error
        metadata[option.group(1)] = value
    return kind, metadata


def _strip_blank(lines: list[str]) -> list[str]:
    start, end = 0, len(lines)
    while start < end and not lines[start].strip():
        start += 1
    while end > start and not lines[end - 1].strip():
        end -= 1
    return lines[start:end]


def _percent_cell(kind: str, metadata: dict[str, Any], body: list[str]) -> Any:
    lines = _strip_blank(body)
    if kind == "markdown":
        source = "\n".join(re.sub(r"^# ?", "", line) for line in lines)
        return _v4.new_markdown_cell(source, metadata=metadata)
    if kind == "raw":
        return _v4.new_raw_cell("\n".join(lines), metadata=metadata)
    return _v4.new_code_cell("\n".join(lines), metadata=metadata)


# Parameters


class _ScalarLoader(yaml.SafeLoader):
    """YAML without timestamps: ``2024-01-01`` stays a string, as the cell needs."""


_ScalarLoader.yaml_implicit_resolvers = {
    first: [(tag, regex) for tag, regex in resolvers if not tag.endswith(":timestamp")]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def parse_parameter(text: str) -> tuple[str, Any]:
    """Parse ``name=value``; the value is YAML, so ``3``, ``0.5``, ``true``,
    ``null`` and ``[1, 2]`` keep their types and anything else is a string.

    Raises:
        InvalidInput: There is no ``=``, or the name is not a Python identifier.
    """
    name, separator, value = text.partition("=")
    name = name.strip()
    if not separator:
        raise InvalidInput(f"a parameter is written name=value, not {text!r}")
    _check_name(name)
    try:
        return name, yaml.load(value, Loader=_ScalarLoader)
    except yaml.YAMLError:
        return name, value


def read_parameters(
    path: str, storage_options: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Read parameters from a YAML or JSON file holding one mapping.

    Args:
        path: A local path or an fsspec URL.
        storage_options: Options of the URL's fsspec filesystem.

    Raises:
        InvalidInput: The file cannot be read, is not YAML, or is not a mapping
            of identifiers to values.
    """
    text = _read_text(path, storage_options)
    try:
        data = yaml.load(text, Loader=_ScalarLoader)
    except yaml.YAMLError as error:
        raise InvalidInput(
            f"the parameters file {path} is not YAML: {error}"
        ) from error
    if not isinstance(data, dict):
        raise InvalidInput(f"the parameters file {path} must hold a mapping")
    for name in data:
        _check_name(name)
    return data


def write_parameters(
    parameters: Mapping[str, Any],
    path: str,
    storage_options: dict[str, Any] | None = None,
) -> None:
    """Write parameters as a JSON file that :func:`read_parameters` reads back.

    Args:
        parameters: Names and JSON values.
        path: A local path (its missing folders are created) or an fsspec URL.
        storage_options: Options of the URL's fsspec filesystem.
    """
    if "://" not in path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with _open(path, "w", storage_options) as stream:
        json.dump(dict(parameters), stream, indent=1, sort_keys=True)


def _check_name(name: object) -> None:
    if not isinstance(name, str) or not name.isidentifier():
        raise InvalidInput(f"the parameter name {name!r} is not a Python identifier")


def _literal(value: Any) -> str:
    """Python source for a parameter value."""
    if isinstance(value, float) and value != value:
        return 'float("nan")'
    if isinstance(value, float) and value in (float("inf"), float("-inf")):
        return 'float("inf")' if value > 0 else 'float("-inf")'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_literal(item) for item in value) + "]"
    if isinstance(value, dict):
        pairs = (f"{_literal(k)}: {_literal(v)}" for k, v in value.items())
        return "{" + ", ".join(pairs) + "}"
    if value is None or isinstance(value, (bool, int, float, str)):
        return repr(value)
    raise InvalidInput(
        f"the parameter value {value!r} is a {type(value).__name__}; use"
        " numbers, strings, booleans, null, lists and mappings"
    )


def inject_parameters(
    notebook: NotebookNode, parameters: Mapping[str, Any]
) -> NotebookNode:
    """Insert a cell tagged ``injected-parameters`` that assigns the parameters.

    It goes right after the cell tagged ``parameters``, or at the top when there
    is none; an ``injected-parameters`` cell already in the notebook (from an
    earlier run) is replaced. The notebook is changed in place and returned.

    Raises:
        InvalidInput: A name is not an identifier or a value has no Python literal.
    """
    for name in parameters:
        _check_name(name)
    lines = [f"{name} = {_literal(value)}" for name, value in parameters.items()]
    cell = _v4.new_code_cell(
        "# Parameters\n" + "\n".join(lines), metadata={"tags": [INJECTED_TAG]}
    )
    if notebook.nbformat_minor < 5:
        del cell["id"]  # cell ids exist from nbformat 4.5 on
    notebook.cells = [c for c in notebook.cells if INJECTED_TAG not in _tags(c)]
    position = next(
        (i + 1 for i, c in enumerate(notebook.cells) if PARAMETERS_TAG in _tags(c)),
        0,
    )
    notebook.cells.insert(position, cell)
    return notebook


def _tags(cell: NotebookNode) -> list[str]:
    return list(cell.get("metadata", {}).get("tags", []))


def default_session_id(path: str) -> str:
    """A session id from a notebook's name plus a short unique suffix.

    ``reports/Sales Q3.ipynb`` gives e.g. ``sales-q3-1a2b3c``.
    """
    stem = PurePosixPath(path.replace("\\", "/")).name.split(".")[0]
    base = re.sub(r"[^a-z0-9]+", "-", stem.lower()).strip("-") or "notebook"
    base = base[: _MAX_ID - _SUFFIX - 1].rstrip("-")
    return f"{base}-{uuid.uuid4().hex[:_SUFFIX]}"


# Running


def run_notebook(
    path: str,
    *,
    parameters: Mapping[str, Any] | None = None,
    session: str | None = None,
    output: str | None = None,
    resume: bool = False,
    store: CheckpointStore | str | None = None,
    store_options: dict[str, Any] | None = None,
    backend: Backend | None = None,
    timeout: float | None = None,
    storage_options: dict[str, Any] | None = None,
    on_output: OutputCallback | None = None,
    on_cell_start: Callable[[CellStart], None] | None = None,
    on_cell_end: Callable[[CellRun], None] | None = None,
) -> NotebookRun:
    """Run a notebook's code cells in order, each as one step of a session.

    The cells' errors are not raised: the returned run's status says whether a
    cell stopped it, and the notebook holds the error as the cell's output.

    Args:
        path: The notebook, ``.ipynb`` or percent-format ``.py``: a local path or
            an fsspec URL.
        parameters: Values to inject after the cell tagged ``parameters``.
            When resuming, they default to the ones of the run being resumed.
        session: The session's id. Defaults to one made from the notebook's name
            or, when resuming, to the session of the run being resumed.
        output: Where to write the executed notebook (a path or an fsspec URL),
            after every cell; None writes nothing.
        resume: Continue the run whose notebook is at ``output``, from its first
            cell that did not finish.
        store: The checkpoint store or its URL (default: the default store).
        store_options: Options of the store's filesystem.
        backend: Where steps run (default: local subprocesses).
        timeout: Seconds each cell may run.
        storage_options: Options of the fsspec filesystem of ``path`` and
            ``output`` when they are URLs (the store's, when they are in it).
        on_output: Called with ``("stdout" | "stderr", text)`` as a cell writes.
        on_cell_start: Called before each code cell runs.
        on_cell_end: Called after each code cell ran or was skipped.

    Returns:
        The run: its status, the executed notebook and every cell's outcome.

    Raises:
        InvalidInput: The notebook or a parameter is invalid, or the run cannot
            be resumed (no output notebook, a finished cell changed, or the
            session moved on since).
        StoreUnavailable: The store cannot be used.
        BackendError: The backend could not run a step.

    Example:
        >>> run = run_notebook("report.ipynb", parameters={"n": 3},
        ...                    output="report.out.ipynb")
        >>> run.status
        'completed'
    """
    previous = _previous_run(output, storage_options) if resume else None
    recorded = previous.metadata["jobrunner"] if previous else {}
    if parameters is None:
        parameters = recorded.get("parameters", {})
    notebook = read_notebook(path, storage_options)
    if parameters:
        inject_parameters(notebook, parameters)
    session_id = session or recorded.get("session") or default_session_id(path)
    if recorded and session_id != recorded["session"]:
        raise InvalidInput(
            f"{output} was run in session {recorded['session']!r}, not"
            f" {session_id!r}; resume it in its own session"
        )
    runner = Session(
        session_id, store=store, backend=backend, store_options=store_options
    )
    state = _RunState(notebook, runner, output, timeout, on_output, storage_options)
    if previous is None:
        state.start(path, dict(parameters))
    else:
        state.restore(previous)
    return state.run(on_cell_start, on_cell_end)


def _previous_run(
    output: str | None, storage_options: dict[str, Any] | None
) -> NotebookNode:
    if output is None:
        raise InvalidInput("resuming needs the output notebook of the run to resume")
    try:
        with _open(output, "r", storage_options) as stream:
            previous: NotebookNode = _nbformat.read(stream, as_version=4)
    except FileNotFoundError:
        raise InvalidInput(f"nothing to resume: {output} does not exist") from None
    except Exception as error:
        raise InvalidInput(f"cannot resume from {output}: {error}") from error
    if "session" not in previous.metadata.get("jobrunner", {}):
        raise InvalidInput(f"cannot resume from {output}: jobrunner did not write it")
    return previous


def _now() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


class _RunState:
    """A notebook being executed: where it stands, and how it is written."""

    def __init__(
        self,
        notebook: NotebookNode,
        session: Session,
        output: str | None,
        timeout: float | None,
        on_output: OutputCallback | None,
        storage_options: dict[str, Any] | None,
    ) -> None:
        self.notebook = notebook
        self.session = session
        self.output = output
        self.timeout = timeout
        self.on_output = on_output
        self.start_at = 0
        self.count = 0
        self.committed = session.head
        self.storage_options = storage_options

    @property
    def record(self) -> dict[str, Any]:
        return self.notebook.metadata["jobrunner"]  # type: ignore[no-any-return]

    def start(self, path: str, parameters: dict[str, Any]) -> None:
        self.notebook.metadata["jobrunner"] = {
            "session": self.session.id,
            "input": path,
            "parameters": parameters,
            "base_step": self.committed,
            "status": "running",
            "started": _now(),
        }

    def restore(self, previous: NotebookNode) -> None:
        """Take over the done cells of an earlier run; find where to go on."""
        cells = _code_cells(self.notebook)
        before = _code_cells(previous)
        recorded = previous.metadata["jobrunner"]
        self.committed = recorded["base_step"]
        self.start_at = len(self.notebook.cells)
        for number, (index, cell) in enumerate(cells):
            old = before[number][1] if number < len(before) else None
            if old is None or _status(old) not in _DONE:
                self.start_at = index
                break
            if old.source != cell.source or _skipped(old) != _skipped(cell):
                raise InvalidInput(
                    f"cell {index + 1} changed since it ran; run the notebook"
                    " again without resuming"
                )
            self._take_over(cell, old)
        self.notebook.metadata["jobrunner"] = {
            **recorded,
            "status": "running",
            "resumed": _now(),
        }
        self.record.pop("stopped_at", None)
        self.record.pop("error", None)
        self._check_head()

    def _take_over(self, cell: NotebookNode, old: NotebookNode) -> None:
        cell.outputs = old.outputs
        cell.execution_count = old.execution_count
        cell.metadata = old.metadata
        self.count = max(self.count, old.execution_count or 0)
        step = old.metadata["jobrunner"].get("step")
        self.committed = step if step is not None else self.committed

    def _check_head(self) -> None:
        head = self.session.head
        if head == self.committed:
            return
        if head == self.committed + 1 and self._adopt(head):
            return
        raise InvalidInput(
            f"session {self.session.id!r} is at step {head}, but the notebook's"
            f" last finished cell left it at step {self.committed}; run the"
            " notebook again without resuming, or in a new session"
        )

    def _adopt(self, step: int) -> bool:
        """Record a cell that committed before its notebook could be written."""
        if self.start_at >= len(self.notebook.cells):
            return False
        cell = self.notebook.cells[self.start_at]
        if _skipped(cell):
            return False
        found = [r for r in self.session.history() if r.step == step]
        if not found or found[-1].code != cell.source:
            return False
        logger.info(
            "cell %d had committed step %d; not running it again", self.start_at, step
        )
        self.count += 1
        self._record(cell, found[-1], "ok", found[-1].started, found[-1].started)
        self.committed = step
        self.start_at = _next_code_cell(self.notebook, self.start_at)
        return True

    def run(
        self,
        on_cell_start: Callable[[CellStart], None] | None,
        on_cell_end: Callable[[CellRun], None] | None,
    ) -> NotebookRun:
        resumed_at = self.start_at if "resumed" in self.record else None
        outcome = NotebookRun(
            self.notebook,
            self.session.id,
            "completed",
            self.output,
            resumed_at=resumed_at,
        )
        todo = [
            index
            for index, cell in _code_cells(self.notebook)
            if index >= self.start_at and not _skipped(cell)
        ]
        self._write()
        for index, cell in _code_cells(self.notebook):
            if index < self.start_at:
                continue
            if _skipped(cell):
                cell.metadata["jobrunner"] = {"status": "skipped", "step": None}
                ran = CellRun(index, "skipped")
            else:
                if on_cell_start is not None:
                    start = CellStart(
                        index, todo.index(index) + 1, len(todo), cell.source
                    )
                    on_cell_start(start)
                ran = self._run_cell(index, cell)
            outcome.cells.append(ran)
            if ran.status in ("failed", "exited"):
                outcome.status = ran.status
                self._stopped(ran)
            if ran.status != "skipped":
                self._write()
            if on_cell_end is not None:
                on_cell_end(ran)
            if ran.status in ("failed", "exited"):
                break
        self.record.update(status=outcome.status, ended=_now())
        self._write()
        return outcome

    def _run_cell(self, index: int, cell: NotebookNode) -> CellRun:
        cell.outputs = []
        cell.execution_count = None
        started = _now()
        result = self.session.run(
            cell.source, timeout=self.timeout, on_output=self.on_output
        )
        ended = _now()
        self.count += 1
        status = _cell_status(result, _tags(cell))
        self._record(cell, result, status, started, ended)
        if result.step is not None:
            self.committed = result.step
        logger.info(
            "cell %d of session %s: %s (step %s)",
            index,
            self.session.id,
            status,
            result.step,
        )
        return CellRun(index, status, self.count, result)

    def _record(
        self,
        cell: NotebookNode,
        result: StepResult,
        status: str,
        started: str,
        ended: str,
    ) -> None:
        cell.execution_count = self.count
        cell.outputs = _outputs(result, self.count)
        timings = result.timings
        cell.metadata["execution"] = {
            "iopub.status.busy": started,
            "iopub.execute_input": started,
            "shell.execute_reply": ended,
            "iopub.status.idle": ended,
        }
        cell.metadata["jobrunner"] = {
            "status": status,
            "step": result.step,
            "attempt": result.attempt,
            "duration": round(timings.load + timings.execute + timings.save, 6),
        }

    def _stopped(self, ran: CellRun) -> None:
        self.record["stopped_at"] = ran.index
        error = ran.result.error if ran.result else None
        if error is not None:
            self.record["error"] = {"type": error.type, "message": error.message}

    def _write(self) -> None:
        if self.output is not None:
            write_notebook(self.notebook, self.output, self.storage_options)


def _code_cells(notebook: NotebookNode) -> list[tuple[int, NotebookNode]]:
    return [(i, c) for i, c in enumerate(notebook.cells) if c.cell_type == "code"]


def _next_code_cell(notebook: NotebookNode, index: int) -> int:
    later = [i for i, _ in _code_cells(notebook) if i > index]
    return later[0] if later else len(notebook.cells)


def _status(cell: NotebookNode) -> str | None:
    status: str | None = cell.get("metadata", {}).get("jobrunner", {}).get("status")
    return status


def _skipped(cell: NotebookNode) -> bool:
    return SKIP_TAG in _tags(cell) or not cell.source.strip()


def _cell_status(result: StepResult, tags: list[str]) -> str:
    if result.ok:
        return "ok"
    if result.status != "error" or result.error is None:
        return "failed"  # timeout, killed, conflict: no tag excuses them
    if RAISES_TAG in tags:
        return "error"
    if result.error.type == "SystemExit" and result.error.message in _CLEAN_EXITS:
        return "exited"
    return "failed"


def _outputs(result: StepResult, count: int) -> list[NotebookNode]:
    """The cell outputs of a step, in the order Jupyter shows them."""
    new = _v4.new_output
    outputs = [
        new("stream", name=name, text=text)
        for name, text in (("stdout", result.stdout), ("stderr", result.stderr))
        if text
    ]
    outputs += [new("display_data", data=dict(data)) for data in result.outputs]
    if result.value is not None:
        outputs.append(
            new(
                "execute_result",
                data={"text/plain": result.value},
                execution_count=count,
            )
        )
    if result.error is not None and not result.ok:
        error = result.error
        lines = (
            error.traceback.rstrip("\n").split("\n")
            if error.traceback
            else [str(error)]
        )
        outputs.append(
            new("error", ename=error.type, evalue=error.message, traceback=lines)
        )
    return outputs


def notebook_text(notebook: NotebookNode) -> str:
    """Return a notebook as nbformat JSON text, ending with a newline."""
    text: str = _nbformat.writes(notebook)
    return text + "\n"


def write_notebook(
    notebook: NotebookNode, path: str, storage_options: dict[str, Any] | None = None
) -> None:
    """Write a notebook whole: a local file is replaced atomically.

    A remote URL is written with one put, which object stores make atomic;
    a local file's missing folders are created.

    Args:
        notebook: The notebook.
        path: A local path or an fsspec URL.
        storage_options: Options of the URL's fsspec filesystem.
    """
    if "://" in path:
        with _open(path, "w", storage_options) as stream:
            _nbformat.write(notebook, stream)
        return
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(
        dir=folder, prefix=".", suffix=".ipynb.tmp"
    )
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as stream:
            _nbformat.write(notebook, stream)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    logger.debug("wrote the notebook %s", path)
