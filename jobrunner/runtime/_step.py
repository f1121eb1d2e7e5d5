"""One step: load the session's namespace, run the code, commit the new state.

This is what runs inside every step's process, a local subprocess or a
Kubernetes pod alike. It imports only the standard library, the store and, when
a checkpoint needs it, dill.
"""

from __future__ import annotations

import ast
import builtins
import io
import linecache
import sys
import time
import traceback
import types
from collections.abc import Iterator
from contextlib import contextmanager
from types import CodeType
from typing import Any, TextIO

from jobrunner.errors import CheckpointCorrupted, CommitConflict, JobRunnerError
from jobrunner.result import StepError, StepResult, Timings
from jobrunner.runtime._display import collect_figures
from jobrunner.runtime._namespace import (
    RESERVED,
    Loader,
    LoadFailed,
    code_names,
    save_namespace,
)
from jobrunner.store import CheckpointStore, Manifest

__all__ = ["DEFAULT_OUTPUT_LIMIT", "run_step"]

DEFAULT_OUTPUT_LIMIT = 1024 * 1024


class StdinNotImplementedError(RuntimeError):
    """Raised by ``input()``: a step has no standard input.

    The name and message are those of Jupyter kernels run without stdin, so a
    notebook behaves the same under jobrunner as under nbclient.
    """


def _no_input(prompt: object = "") -> str:
    raise StdinNotImplementedError(
        "raw_input was called, but this frontend does not support input requests."
    )


class _Capture(io.TextIOBase):
    """Keeps what the code writes (up to a limit) and passes it on live."""

    def __init__(self, live: TextIO, limit: int) -> None:
        self.live = live
        self.limit = limit
        self.parts: list[str] = []
        self.kept = 0
        self.cut = 0

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        room = self.limit - self.kept
        if room >= len(text):
            self.parts.append(text)
            self.kept += len(text)
            self.live.write(text)
        else:
            if room > 0:
                self.parts.append(text[:room])
                self.kept += room
                self.live.write(text[:room])
            if not self.cut:
                self.live.write(
                    f"\n[jobrunner: output over {self.limit} characters cut]\n"
                )
            self.cut += len(text) - max(room, 0)
        return len(text)

    def flush(self) -> None:
        self.live.flush()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return "utf-8"

    def text(self) -> str:
        kept = "".join(self.parts)
        if self.cut:
            kept += f"\n[jobrunner: {self.cut} more characters of output were cut]\n"
        return kept


@contextmanager
def _captured(limit: int) -> Iterator[tuple[_Capture, _Capture]]:
    stdout, stderr = _Capture(sys.stdout, limit), _Capture(sys.stderr, limit)
    saved = sys.stdout, sys.stderr, builtins.input
    sys.stdout, sys.stderr, builtins.input = stdout, stderr, _no_input
    try:
        yield stdout, stderr
    finally:
        sys.stdout, sys.stderr, builtins.input = saved
        stdout.flush()
        stderr.flush()


def _compile(source: str, filename: str) -> tuple[CodeType, CodeType | None]:
    """Compile a step; a trailing expression is compiled apart, for its value."""
    tree = ast.parse(source, filename)
    last = None
    if tree.body and isinstance(tree.body[-1], ast.Expr):
        last = ast.Expression(tree.body[-1].value)
        del tree.body[-1]
    body = compile(tree, filename, "exec")
    return body, compile(last, filename, "eval") if last else None


def _user_traceback(error: BaseException, filename: str) -> str:
    """Format an exception from the step's first frame on: no runtime frames."""
    tb = error.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename != filename:
        tb = tb.tb_next
    lines = traceback.format_exception(type(error), error, tb)
    return "".join(lines)


def _step_error(error: BaseException, filename: str) -> StepError:
    return StepError(
        type=type(error).__name__,
        message=str(error),
        traceback=_user_traceback(error, filename),
    )


_OUT_OF_MEMORY = "OutOfMemory"


def _memory_error(error: MemoryError, filename: str) -> StepError:
    """Report running out of a memory limit as the step being stopped for it."""
    import resource

    limit, _ = resource.getrlimit(resource.RLIMIT_AS)
    if limit == resource.RLIM_INFINITY:
        return _step_error(error, filename)
    return StepError(
        type=_OUT_OF_MEMORY,
        message=f"the step ran out of its memory limit of {limit // 2**20}Mi;"
        " raise --memory",
        traceback=_user_traceback(error, filename),
    )


def _new_namespace() -> dict[str, Any]:
    # The session's module stands in for __main__, so that pickle finds
    # classes and functions defined in the session by their module's name.
    module = types.ModuleType("__main__")
    module.__dict__["__builtins__"] = builtins
    sys.modules["__main__"] = module
    return module.__dict__


class _Step:
    """The state of one attempt as it goes through its phases."""

    def __init__(self, store: CheckpointStore, session: str, attempt: str) -> None:
        self.store = store
        self.session = session
        self.attempt = attempt
        self.started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self.clock = time.perf_counter()
        self.timings: dict[str, float] = {}

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.timings[phase] = now - self.clock
        self.clock = now

    def result(self, code: str, status: str, **fields: Any) -> StepResult:
        return StepResult(
            session=self.session,
            attempt=self.attempt,
            status=status,
            code=code,
            started=self.started,
            timings=Timings(**self.timings),
            **fields,
        )


def run_step(store: CheckpointStore, session: str, attempt: str) -> StepResult:
    """Run one attempt of a step and record its result in the store.

    Returns:
        The result, as recorded.
    """
    step = _Step(store, session, attempt)
    try:
        request = store.read_request(session, attempt)
    except CheckpointCorrupted as error:
        # A request that is not the caller's is never run, and says why.
        result = step.result(
            "", "error", error=StepError(type(error).__name__, str(error))
        )
        store.record(result)
        return result
    result = _run(step, request["code"], request.get("output_limit"))
    store.record(result)
    return result


def _run(step: _Step, code: str, output_limit: int | None) -> StepResult:
    store = step.store
    try:
        base = store.manifest(step.session)
    except JobRunnerError as error:
        return step.result(
            code, "error", error=StepError(type(error).__name__, str(error))
        )
    filename = f"<step {base.step + 1}>"
    linecache.cache[filename] = (len(code), None, code.splitlines(True), filename)
    namespace = _new_namespace()
    limit = output_limit or DEFAULT_OUTPUT_LIMIT
    common = {"base_step": base.step}
    with _captured(limit) as (stdout, stderr):
        outcome = _load_and_execute(step, base, code, filename, namespace, stderr)

    def finish(status: str, **fields: Any) -> StepResult:
        fields.update(common, stdout=stdout.text(), stderr=stderr.text())
        return step.result(code, status, **fields)

    if isinstance(outcome, StepError):
        status = "killed" if outcome.type == _OUT_OF_MEMORY else "error"
        return finish(status, error=outcome, outputs=tuple(collect_figures()))
    loader, value = outcome
    # Before saving: a figure kept in a variable must be saved closed.
    figures = tuple(collect_figures())
    try:
        manifest, fields = _save(step, base, namespace, loader)
        step.lap("save")
        result = finish("ok", value=value, outputs=figures, **fields)
        # The manifest keeps the result without its output, which can be large
        # and which the next step would otherwise read back for nothing.
        manifest.result = result.to_dict() | {"stdout": "", "stderr": "", "outputs": []}
        store.commit(manifest)
    except CommitConflict as error:
        step.lap("save")
        return finish("conflict", error=StepError("CommitConflict", str(error)))
    except JobRunnerError as error:
        step.lap("save")
        return finish("error", error=StepError(type(error).__name__, str(error)))
    return result


def _load_and_execute(
    step: _Step,
    base: Manifest,
    code: str,
    filename: str,
    namespace: dict[str, Any],
    stderr: _Capture,
) -> StepError | tuple[Loader, str | None]:
    store = step.store

    def read_blob(digest: str, name: str) -> memoryview:
        return store.read_blob(digest, session=step.session, name=name)

    writer = {"python": base.python, "dill": base.dill}
    loader = Loader(
        namespace, base.variables, base.modules, read_blob, base.blobs, writer
    )
    try:
        body, last = _compile(code, filename)
    except SyntaxError as error:
        step.lap("load")
        return StepError(type(error).__name__, str(error), _user_traceback(error, ""))
    names = code_names(body) | (code_names(last) if last else set())
    try:
        loader.load(
            loader.everything() if loader.dynamic(names) else loader.closure(names)
        )
    except (LoadFailed, JobRunnerError) as error:
        step.lap("load")
        return StepError(type(error).__name__, str(error))
    finally:
        for warning in loader.warnings:
            stderr.write(warning + "\n")
    step.lap("load")
    try:
        exec(body, namespace)
        value = eval(last, namespace) if last else None
    except BaseException as error:  # noqa: BLE001 - user code may raise anything
        step.lap("execute")
        if isinstance(error, MemoryError):
            return _memory_error(error, filename)
        return _step_error(error, filename)
    step.lap("execute")
    return loader, None if value is None else _safe_repr(value)


def _safe_repr(value: Any) -> str:
    try:
        return repr(value)
    except Exception as error:  # noqa: BLE001 - a broken __repr__ is the user's
        return f"<repr failed: {type(error).__name__}: {error}>"


def _save(
    step: _Step, base: Manifest, namespace: dict[str, Any], loader: Loader
) -> tuple[Manifest, dict[str, Any]]:
    """Write the blobs of what the step touched; return the next manifest.

    Variables the step did not load are carried over from the base manifest
    without being pickled or hashed: code that did not load them cannot have
    changed them.
    """
    current = [name for name in namespace if name not in RESERVED]
    saved = save_namespace(namespace, current)
    variables = {
        name: entry
        for name, entry in base.variables.items()
        if name not in loader.loaded
    }
    modules = {
        name: module
        for name, module in base.modules.items()
        if name not in loader.loaded
    }
    variables.update(saved.entries(namespace))
    modules.update(saved.modules)
    referenced = {entry["blob"] for entry in variables.values()}
    blobs = {
        digest: base.blobs[digest] for digest in referenced if digest in base.blobs
    }
    written = 0
    for blob in saved.blobs:
        if blob.digest not in blobs:
            written += step.store.write_blob(blob.data, blob.digest)
        blobs[blob.digest] = {
            "size": len(blob.data),
            "pickler": blob.pickler,
            "python": sys.version.split()[0],
            "dill": sys.modules["dill"].__version__ if blob.pickler == "dill" else None,
        }
    manifest = Manifest(
        session=step.session,
        step=base.step + 1,
        variables=variables,
        blobs=blobs,
        modules=modules,
        dill=sys.modules["dill"].__version__ if "dill" in sys.modules else None,
    )
    fields = _changes(base, variables, modules, saved.dropped)
    fields.update(step=manifest.step, dropped=saved.dropped, bytes_written=written)
    return manifest, fields


def _changes(
    base: Manifest,
    variables: dict[str, dict[str, Any]],
    modules: dict[str, str],
    dropped: dict[str, str],
) -> dict[str, Any]:
    def identity(name: str, vars_: dict[str, Any], mods: dict[str, str]) -> Any:
        if name in mods:
            return ("module", mods[name])
        return ("blob", vars_[name]["blob"]) if name in vars_ else None

    before = set(base.variables) | set(base.modules)
    after = set(variables) | set(modules)
    changed = [
        name
        for name in before & after
        if identity(name, base.variables, base.modules)
        != identity(name, variables, modules)
    ]
    return {
        "created": tuple(sorted(after - before)),
        "changed": tuple(sorted(changed)),
        "deleted": tuple(sorted(before - after - set(dropped))),
    }
