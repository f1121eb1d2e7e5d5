"""The library's entry point: a session whose steps each run in a new process."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any

from jobrunner.backends.base import (
    Backend,
    OutputCallback,
    StepExit,
    StepLaunch,
    runtime_arguments,
    runtime_environment,
)
from jobrunner.errors import (
    CommitConflict,
    InvalidInput,
    JobRunnerError,
    StepCrashed,
    StepKilled,
    StoreUnavailable,
)
from jobrunner.result import StepError, StepResult
from jobrunner.store import (
    DEFAULT_GRACE,
    CheckpointStore,
    GcReport,
    StepDiff,
    new_attempt_id,
    validate_session_id,
)

__all__ = [
    "Session",
    "Variable",
    "delete_session",
    "gc",
    "list_sessions",
    "raise_for_status",
]

logger = logging.getLogger(__name__)

# The runtime's exit code when it could not use the store (see its __main__).
_STORE_FAILED = 3
# How a backend says a step's process was stopped, and the error type reported.
_KILLED = {"killed": "Killed", "cancelled": "Cancelled", "oom": "OutOfMemory"}


@dataclass(frozen=True)
class Variable:
    """A variable of a committed step, as its manifest describes it."""

    name: str
    type: str
    size: int
    kind: str = "value"


def _open_store(
    store: CheckpointStore | str | None, options: dict[str, Any] | None
) -> CheckpointStore:
    if isinstance(store, CheckpointStore):
        return store
    return CheckpointStore(store, options=options)


def list_sessions(
    store: CheckpointStore | str | None = None,
    *,
    store_options: dict[str, Any] | None = None,
) -> list[str]:
    """Return the ids of the sessions in a store (default: the default store)."""
    return _open_store(store, store_options).sessions()


def gc(
    store: CheckpointStore | str | None = None,
    *,
    keep_last: int | None = None,
    older_than: float | None = None,
    grace: float = DEFAULT_GRACE,
    dry_run: bool = False,
    store_options: dict[str, Any] | None = None,
) -> GcReport:
    """Remove old steps of every session, then the blobs no manifest lists.

    The last step of a session always stays. Blobs that no manifest lists but
    that are younger than ``grace`` seconds stay too: a running step may be
    about to commit them.

    Args:
        store: A :class:`CheckpointStore` or its URL (default: the default store).
        keep_last: Keep at least this many of each session's last steps.
        older_than: Remove only steps committed more than this many seconds ago.
        grace: Keep unreferenced blobs younger than this many seconds.
        dry_run: Report what would be removed; remove nothing.
        store_options: Options of the store's filesystem, when ``store`` is a URL.

    Returns:
        What was removed: steps, attempts, blobs and bytes.

    Raises:
        InvalidInput: An argument is out of range.
        CheckpointCorrupted: A manifest cannot be read; no blob was removed.

    Example:
        >>> gc(keep_last=10, older_than=7 * 86400).bytes_freed  # doctest: +SKIP
        104857600
    """
    return _open_store(store, store_options).gc(
        keep_last=keep_last, older_than=older_than, grace=grace, dry_run=dry_run
    )


def delete_session(
    session_id: str,
    store: CheckpointStore | str | None = None,
    *,
    grace: float = DEFAULT_GRACE,
    dry_run: bool = False,
    store_options: dict[str, Any] | None = None,
) -> GcReport:
    """Delete a session's history, then the blobs no other session lists.

    Raises:
        InvalidSessionId: The id is not a DNS label.
        UnknownSession: The store holds no such session.
    """
    validate_session_id(session_id)
    return _open_store(store, store_options).delete(
        session_id, grace=grace, dry_run=dry_run
    )


def raise_for_status(result: StepResult) -> StepResult:
    """Return the result if it committed, else raise the matching error.

    Raises:
        CommitConflict: Another step committed first.
        StepKilled: The step timed out, was cancelled or killed.
        StepCrashed: The user's code raised or the runtime failed.
    """
    if result.status == "ok":
        return result
    message = str(result.error) if result.error else result.status
    if result.status == "conflict":
        raise CommitConflict(result.session, result.base_step + 1)
    if result.status in ("timeout", "killed"):
        raise StepKilled(message, session=result.session, reason=result.status)
    raise StepCrashed(message, session=result.session, exit_code=1)


class Session:
    """A REPL-like Python session whose every step runs in a fresh process.

    Args:
        session_id: The session's id: 1 to 63 lowercase letters, digits and
            ``-`` (it names Kubernetes Jobs and labels).
        store: A :class:`CheckpointStore` or its URL. Defaults to
            ``$JOBRUNNER_STORE``, else ``./checkpoints``.
        backend: Where steps run. Defaults to a :class:`LocalBackend`.
        store_options: Options of the store's filesystem, when ``store`` is a URL.

    Raises:
        InvalidSessionId: The id is not a DNS label.

    Example:
        >>> s = Session("demo")
        >>> s.run("x = 41\\nx + 1").value
        '42'
    """

    def __init__(
        self,
        session_id: str,
        *,
        store: CheckpointStore | str | None = None,
        backend: Backend | None = None,
        store_options: dict[str, Any] | None = None,
    ) -> None:
        self.id = validate_session_id(session_id)
        self.store = _open_store(store, store_options)
        if backend is None:
            from jobrunner.backends.local import LocalBackend

            backend = LocalBackend()
        self.backend = backend

    def __repr__(self) -> str:
        return (
            f"Session({self.id!r}, store={self.store.url!r}, backend={self.backend!r})"
        )

    def run(
        self,
        code: str | bytes,
        *,
        timeout: float | None = None,
        on_output: OutputCallback | None = None,
        retry_on_conflict: int = 0,
        output_limit: int | None = None,
    ) -> StepResult:
        """Run one step and return its result.

        The code's own errors are not raised: they are in the result (status
        ``error``). A step that raised, timed out, conflicted or was killed
        leaves the session's state as it was.

        Args:
            code: The step's source code (bytes must be UTF-8).
            timeout: Seconds after which the step is stopped (status ``timeout``).
            on_output: Called with ``("stdout" | "stderr", text)`` as the step
                writes, for watching; the result holds the output too.
            retry_on_conflict: How many times to run the step again when another
                step committed first.
            output_limit: Characters of stdout and of stderr kept in the result.

        Raises:
            InvalidInput: The code is not text.
            StoreUnavailable: The store cannot be written to.
            BackendError: The backend could not run the step.
        """
        source = _source(code)
        _check_options(timeout, retry_on_conflict, output_limit)
        for attempt in range(retry_on_conflict + 1):
            result = self._attempt(source, timeout, on_output, output_limit)
            if result.status != "conflict" or attempt == retry_on_conflict:
                return result
            logger.info("step conflicted in session %s; running it again", self.id)
        raise AssertionError("unreachable")

    def _attempt(
        self,
        code: str,
        timeout: float | None,
        on_output: OutputCallback | None,
        output_limit: int | None,
    ) -> StepResult:
        attempt = new_attempt_id()
        requested = time.time()
        self.store.write_request(
            self.id, attempt, {"code": code, "output_limit": output_limit}
        )
        launch = StepLaunch(
            session=self.id,
            attempt=attempt,
            step=self.store.head(self.id) + 1,
            # The store's full URL (an absolute path for a folder): the step
            # does not run in the caller's working directory.
            arguments=runtime_arguments(
                self.store.files.url, self.store.options, self.id, attempt
            ),
            environment=self._environment(),
            timeout=timeout,
        )
        ended = self.backend.run(launch, on_output)
        try:
            result = self.store.attempt(self.id, attempt)
            if result is None:
                result = self._outcome_of_lost_attempt(code, attempt, requested, ended)
        except StoreUnavailable as error:
            # The store went down during the step: nothing more can be learned
            # or recorded, and the step's commit, if any, is found next time.
            result = StepResult(
                session=self.id,
                attempt=attempt,
                status="error",
                code=code,
                error=StepError(StoreUnavailable.__name__, str(error)),
                base_step=launch.step - 1,
            )
        logger.info(
            "step of session %s ended: %s (committed step %s)",
            self.id,
            result.status,
            result.step,
        )
        return result

    def _environment(self) -> dict[str, str]:
        """The step's environment: the backend's, then the store's secrets."""
        key = self.store.key_for_session(self.id)
        secrets = runtime_environment(
            self.store.options, key.to_text() if key else None
        )
        return {**self.backend.environment(self.id), **secrets}

    def _outcome_of_lost_attempt(
        self, code: str, attempt: str, requested: float, ended: StepExit
    ) -> StepResult:
        """Build the result of an attempt whose runtime recorded none."""
        committed = self.store.committed_by(self.id, attempt, since=requested)
        if committed is not None:
            self.store.record(committed)
            return committed
        status, error = _failure(ended)
        result = StepResult(
            session=self.id,
            attempt=attempt,
            status=status,
            code=code,
            error=error,
            base_step=self.store.head(self.id),
            started=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(requested)),
        )
        try:
            self.store.record(result)
        except JobRunnerError:
            logger.warning("could not record the failed step of session %s", self.id)
        return result

    def cancel(self) -> int:
        """Stop this session's running steps; return how many were stopped."""
        return self.backend.cancel(self.id)

    @property
    def head(self) -> int:
        """The session's last committed step (0 before the first)."""
        return self.store.head(self.id)

    def history(self, last: int | None = None) -> list[StepResult]:
        """Return the results of every attempt, failed ones included, oldest first.

        Raises:
            UnknownSession: The store holds no such session.
        """
        return self.store.history(self.id, last)

    def diff(self, before: int, after: int | None = None) -> StepDiff:
        """Return the names added, removed and changed between two steps.

        Only the manifests are compared (blobs and modules); nothing is
        unpickled.

        Args:
            before: The earlier committed step (0: the empty namespace).
            after: The later committed step (default: the last).

        Raises:
            UnknownSession: The store holds no such session.
            UnknownStep: The session has not committed one of the steps.
        """
        return self.store.diff(self.id, before, self.head if after is None else after)

    def rollback(self, step: int) -> StepResult:
        """Make an earlier step's state current again, as a new step.

        History is kept: the new step is recorded like any other, with the
        code ``# rollback to step N``, and no blob is written.

        Args:
            step: The committed step to return to (0: the empty namespace).

        Returns:
            The new step's result.

        Raises:
            UnknownSession: The store holds no such session.
            UnknownStep: The session has not committed that step.
            CommitConflict: A step committed first; run the rollback again.
        """
        return self.store.rollback(self.id, step)

    def fork(self, new_id: str, step: int | None = None) -> Session:
        """Start a new session from this one's state at a step.

        It takes the same time whatever the session holds: the new session's
        step 1 lists this step's blobs, which the two sessions then share.

        Args:
            new_id: The new session's id; it must not exist yet.
            step: The committed step to fork from (default: the last).

        Returns:
            The new session, on the same store and backend.

        Raises:
            InvalidSessionId: ``new_id`` is not a DNS label.
            InvalidInput: A session ``new_id`` exists already.
            UnknownStep: This session has not committed that step.
        """
        self.store.fork(self.id, new_id, step)
        return Session(new_id, store=self.store, backend=self.backend)

    def variables(self, step: int | None = None) -> list[Variable]:
        """Return the variables of a committed step (default: the last).

        Nothing is unpickled: names, types and sizes come from the manifest.

        Raises:
            UnknownSession: The store holds no such session.
            UnknownStep: The session has not committed that step.
        """
        self.store.require(self.id)
        manifest = self.store.manifest(self.id, step)
        found = [
            Variable(name, entry["type"], entry["size"])
            for name, entry in manifest.variables.items()
        ]
        found += [
            Variable(name, f"module {module}", 0, kind="module")
            for name, module in manifest.modules.items()
        ]
        return sorted(found, key=lambda variable: variable.name)


def _source(code: str | bytes) -> str:
    if isinstance(code, bytes):
        try:
            return code.decode("utf-8")
        except UnicodeDecodeError as error:
            raise InvalidInput(
                f"the step's code is not UTF-8 text (byte {error.start} is"
                f" 0x{code[error.start]:02x})"
            ) from None
    if not isinstance(code, str):
        raise InvalidInput(f"the step's code must be text, not {type(code).__name__}")
    if "\x00" in code:
        raise InvalidInput("the step's code contains a NUL character")
    return code


def _check_options(
    timeout: float | None, retry_on_conflict: int, output_limit: int | None
) -> None:
    if timeout is not None and not (math.isfinite(timeout) and timeout > 0):
        raise InvalidInput(
            f"timeout must be a positive number of seconds, not {timeout!r}"
        )
    if not isinstance(retry_on_conflict, int) or retry_on_conflict < 0:
        raise InvalidInput(
            f"retry_on_conflict must be a whole number >= 0, not {retry_on_conflict!r}"
        )
    if output_limit is not None and (
        not isinstance(output_limit, int) or output_limit < 1
    ):
        raise InvalidInput(
            f"output_limit must be a whole number >= 1, not {output_limit!r}"
        )


def _failure(ended: StepExit) -> tuple[str, StepError]:
    """Turn a process that ended without a result into a status and an error."""
    last_line = ended.stderr_tail.strip().splitlines()[-1:] or [""]
    if ended.reason == "timeout":
        return "timeout", StepError("Timeout", ended.message)
    if ended.reason in _KILLED:
        return "killed", StepError(_KILLED[ended.reason], ended.message)
    if ended.exit_code == _STORE_FAILED:
        message = last_line[0].removeprefix("jobrunner: ")
        return "error", StepError(StoreUnavailable.__name__, message)
    detail = f": {last_line[0]}" if last_line[0] else ""
    return "error", StepError(
        StepCrashed.__name__,
        f"the step runtime exited with code {ended.exit_code} before recording"
        f" a result{detail}",
    )
