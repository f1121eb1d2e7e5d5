"""The local backend: each step runs as a fresh subprocess on this machine."""

from __future__ import annotations

import codecs
import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
from collections import deque
from collections.abc import Callable

from jobrunner.backends.base import (
    RUNTIME_MODULE,
    Backend,
    OutputCallback,
    StepExit,
    StepLaunch,
)

__all__ = ["LocalBackend"]

logger = logging.getLogger(__name__)

_CHUNK = 64 * 1024


class LocalBackend(Backend):
    """Runs each step as ``python -m jobrunner.runtime`` in a new process.

    The process is started exactly as a Kubernetes Job starts it, with the same
    module and arguments, and exits when the step ends: nothing lives between
    steps. It runs in its own process group, so that a timeout or a cancel also
    stops any process the step started.

    Args:
        python: The interpreter to run; defaults to the caller's.
        workdir: The steps' working directory; defaults to the caller's.
        memory_limit: Bytes of address space a step may use, or None.
    """

    name = "local"

    def __init__(
        self,
        *,
        python: str | None = None,
        workdir: str | None = None,
        memory_limit: int | None = None,
    ) -> None:
        self.python = python or sys.executable
        self.workdir = workdir
        self.memory_limit = memory_limit
        self._running: dict[str, tuple[str, subprocess.Popen[bytes]]] = {}
        self._cancelled: set[str] = set()
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"LocalBackend(python={self.python!r})"

    def run(self, launch: StepLaunch, on_output: OutputCallback | None) -> StepExit:
        command = [self.python, "-m", RUNTIME_MODULE, *launch.arguments]
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=self.workdir,
            env={**os.environ, **launch.environment},
            start_new_session=True,
            preexec_fn=self._limits(self.memory_limit) if self.memory_limit else None,
        )
        logger.info("started step of session %s (pid %d)", launch.session, process.pid)
        with self._lock:
            self._running[launch.attempt] = (launch.session, process)
        tail: deque[str] = deque(maxlen=20)
        readers = [
            _reader(process.stdout, "stdout", on_output, None),
            _reader(process.stderr, "stderr", on_output, tail),
        ]
        try:
            return self._wait(process, launch, readers, tail)
        finally:
            with self._lock:
                self._running.pop(launch.attempt, None)
                self._cancelled.discard(launch.attempt)

    def _wait(
        self,
        process: subprocess.Popen[bytes],
        launch: StepLaunch,
        readers: list[threading.Thread],
        tail: deque[str],
    ) -> StepExit:
        try:
            code = process.wait(timeout=launch.timeout)
        except subprocess.TimeoutExpired:
            _kill_group(process)
            process.wait()
            reason, message = "timeout", f"the step ran longer than {launch.timeout}s"
        else:
            reason, message = self._reason(launch.attempt, code)
        for reader in readers:
            reader.join()
        return StepExit(
            reason=reason,
            exit_code=process.returncode,
            message=message,
            stderr_tail="".join(tail),
        )

    def _reason(self, attempt: str, code: int) -> tuple[str, str]:
        with self._lock:
            cancelled = attempt in self._cancelled
        if cancelled:
            return "cancelled", "the step was cancelled"
        if code < 0:
            name = signal.Signals(-code).name
            return "killed", f"the step's process was killed by {name}"
        return "exited", ""

    @staticmethod
    def _limits(limit: int) -> Callable[[], None]:
        def apply() -> None:
            import resource

            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

        return apply

    def cancel(self, session: str | None = None) -> int:
        with self._lock:
            chosen = [
                (attempt, process)
                for attempt, (owner, process) in self._running.items()
                if session is None or owner == session
            ]
            self._cancelled.update(attempt for attempt, _ in chosen)
        for _, process in chosen:
            _kill_group(process)
        if chosen:
            logger.info("cancelled %d running step(s)", len(chosen))
        return len(chosen)


def _kill_group(process: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)


def _reader(
    stream: object,
    name: str,
    on_output: OutputCallback | None,
    tail: deque[str] | None,
) -> threading.Thread:
    def read() -> None:
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        fd = stream.fileno()  # type: ignore[attr-defined]
        while chunk := os.read(fd, _CHUNK):
            text = decoder.decode(chunk)
            if tail is not None:
                tail.append(text)
            if on_output is not None and text:
                on_output(name, text)
        stream.close()  # type: ignore[attr-defined]

    thread = threading.Thread(target=read, name=f"step-{name}", daemon=True)
    thread.start()
    return thread
