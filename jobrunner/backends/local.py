"""The local backend: each step runs as a fresh process on this machine."""

from __future__ import annotations

import codecs
import contextlib
import json
import logging
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import weakref
from collections import deque
from collections.abc import Callable, Mapping
from typing import IO, Protocol

from jobrunner.backends.base import (
    RUNTIME_MODULE,
    Backend,
    OutputCallback,
    StepExit,
    StepLaunch,
)
from jobrunner.errors import BackendError

__all__ = ["LocalBackend"]

logger = logging.getLogger(__name__)

_CHUNK = 64 * 1024
_WARM_MODULE = "jobrunner.runtime._warm"
_MASTER_KEY_VARIABLES = ("JOBRUNNER_SIGNING_KEY", "JOBRUNNER_SIGNING_KEY_FILE")


class _Process(Protocol):
    """A running step's process, however it was started."""

    pid: int

    def wait(self, timeout: float | None) -> int:
        """Return the exit code (negative: killed by that signal)."""
        ...


class _Spawned:
    """A step started as ``python -m jobrunner.runtime`` by subprocess."""

    def __init__(self, popen: subprocess.Popen[bytes]) -> None:
        self.popen = popen
        self.pid = popen.pid
        assert popen.stdout is not None and popen.stderr is not None
        self.outputs: list[IO[bytes]] = [popen.stdout, popen.stderr]

    def wait(self, timeout: float | None) -> int:
        return self.popen.wait(timeout=timeout)


class _Forked:
    """A step forked by the warm parent; its exit code arrives on the socket."""

    def __init__(self, connection: socket.socket, outputs: list[IO[bytes]]) -> None:
        self.connection = connection
        self.outputs = outputs
        self.buffer = b""
        self.pid = int(self._message(None)["pid"])

    def _message(self, timeout: float | None) -> dict[str, int]:
        while b"\n" not in self.buffer:
            ready, _, _ = select.select([self.connection], [], [], timeout)
            if not ready:
                raise subprocess.TimeoutExpired("step", timeout or 0)
            chunk = self.connection.recv(4096)
            if not chunk:
                raise ConnectionError("the warm parent closed the connection")
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        message: dict[str, int] = json.loads(line)
        return message

    def wait(self, timeout: float | None) -> int:
        try:
            return int(self._message(timeout)["exit"])
        except (ConnectionError, ValueError):
            # The parent died: its children die with it (PR_SET_PDEATHSIG).
            _kill_group(self.pid)
            return -signal.SIGKILL

    def close(self) -> None:
        self.connection.close()


class _WarmParent:
    """The warm parent process, started on first use and again if it died."""

    def __init__(self, python: str) -> None:
        self.python = python
        self.folder = ""
        self.process: subprocess.Popen[bytes] | None = None
        self.lock = threading.Lock()

    @property
    def socket_path(self) -> str:
        return os.path.join(self.folder, "warm.sock")

    def connect(self) -> socket.socket:
        with self.lock:
            if self.process is None or self.process.poll() is not None:
                self._start()
            connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                connection.connect(self.socket_path)
            except OSError:
                connection.close()
                raise
            return connection

    def _start(self) -> None:
        self.stop()
        self.folder = tempfile.mkdtemp(prefix="jobrunner-warm-")
        self.process = subprocess.Popen(
            [self.python, "-m", _WARM_MODULE, "--socket", self.socket_path],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            start_new_session=True,
            env=_without_master_key(os.environ),
        )
        assert self.process.stdout is not None
        if self.process.stdout.readline() != b"ready\n":
            code = self.process.wait()
            raise BackendError(f"the warm parent failed to start (exit code {code})")
        logger.info("started the warm parent (pid %d)", self.process.pid)

    def stop(self) -> None:
        if self.process is not None:
            for stream in (self.process.stdin, self.process.stdout):
                if stream is not None:
                    stream.close()  # the lifeline: the parent exits on EOF
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            self.process = None
        if self.folder:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = ""


class LocalBackend(Backend):
    """Runs each step as ``python -m jobrunner.runtime`` in a new process.

    The process runs the same module with the same arguments as a Kubernetes
    Job's container, and exits when the step ends: nothing lives between steps.
    It runs in its own process group, so that a timeout or a cancel also stops
    any process the step started.

    Args:
        python: The interpreter to run; defaults to the caller's.
        workdir: The steps' working directory. By default each step gets a new
            empty folder, removed when it ends, as a pod gets a scratch volume:
            code that deletes or overwrites files where it runs cannot touch
            the caller's files or a store under the caller's folder.
        memory_limit: Bytes of address space a step may use, or None.
        warm: Fork each step from a warm parent that has already imported the
            runtime, instead of starting a new interpreter. Each step is still
            a new process that exits when the step ends; only the interpreter's
            start-up and the runtime's imports are saved.

    Example:
        >>> Session("fast", backend=LocalBackend(warm=True)).run("1 + 1").value
        '2'
    """

    name = "local"

    def __init__(
        self,
        *,
        python: str | None = None,
        workdir: str | None = None,
        memory_limit: int | None = None,
        warm: bool = False,
    ) -> None:
        self.python = python or sys.executable
        self.workdir = workdir
        self.memory_limit = memory_limit
        self.warm = warm
        self._parent = _WarmParent(self.python) if warm else None
        if self._parent is not None:
            weakref.finalize(self, self._parent.stop)
        self._running: dict[str, tuple[str, int]] = {}
        self._cancelled: set[str] = set()
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"LocalBackend(python={self.python!r}, warm={self.warm})"

    def close(self) -> None:
        """Stop the warm parent, if any; it starts again on the next step."""
        if self._parent is not None:
            self._parent.stop()

    def run(self, launch: StepLaunch, on_output: OutputCallback | None) -> StepExit:
        if self.workdir is not None:
            return self._run(launch, on_output, self.workdir)
        with tempfile.TemporaryDirectory(
            prefix=f"jobrunner-{launch.session}-"
        ) as scratch:
            return self._run(launch, on_output, scratch)

    def _run(
        self, launch: StepLaunch, on_output: OutputCallback | None, workdir: str
    ) -> StepExit:
        process = (
            self._fork(launch, workdir)
            if self._parent
            else self._spawn(launch, workdir)
        )
        logger.info("started step of session %s (pid %d)", launch.session, process.pid)
        with self._lock:
            self._running[launch.attempt] = (launch.session, process.pid)
        tail: deque[str] = deque(maxlen=20)
        readers = [
            _reader(process.outputs[0], "stdout", on_output, None),
            _reader(process.outputs[1], "stderr", on_output, tail),
        ]
        try:
            return self._wait(process, launch, readers, tail)
        except KeyboardInterrupt:
            # The step runs in its own session, out of reach of the terminal's
            # Ctrl-C: stop it here, before it can commit.
            _kill_group(process.pid)
            raise
        finally:
            if isinstance(process, _Forked):
                process.close()
            with self._lock:
                self._running.pop(launch.attempt, None)
                self._cancelled.discard(launch.attempt)

    def _spawn(self, launch: StepLaunch, workdir: str) -> _Spawned:
        limit = self.memory_limit
        popen = subprocess.Popen(
            [self.python, "-m", RUNTIME_MODULE, *launch.arguments],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=workdir,
            env={**os.environ, **launch.environment},
            start_new_session=True,
            preexec_fn=_address_space_limit(limit) if limit else None,
        )
        return _Spawned(popen)

    def _fork(self, launch: StepLaunch, workdir: str) -> _Forked:
        assert self._parent is not None
        request = {
            "arguments": launch.arguments,
            "environment": launch.environment,
            "cwd": workdir,
            "memory_limit": self.memory_limit,
        }
        try:
            return self._send(request)
        except OSError as error:
            # The parent died between two steps (its socket refuses or drops
            # the request): start a new one and ask once more.
            logger.info("the warm parent did not take the step (%r); restarting", error)
            self._parent.stop()
            try:
                return self._send(request)
            except OSError as again:
                message = f"the warm parent failed to start a step: {again}"
                raise BackendError(message) from again

    def _send(self, request: Mapping[str, object]) -> _Forked:
        assert self._parent is not None
        connection = self._parent.connect()
        pipes = [os.pipe(), os.pipe()]
        outputs: list[IO[bytes]] = [os.fdopen(read, "rb") for read, _ in pipes]
        try:
            socket.send_fds(
                connection, [json.dumps(request).encode()], [w for _, w in pipes]
            )
            return _Forked(connection, outputs)
        except (OSError, ValueError):
            connection.close()
            for output in outputs:
                output.close()
            raise
        finally:
            for _, write in pipes:
                os.close(write)

    def _wait(
        self,
        process: _Spawned | _Forked,
        launch: StepLaunch,
        readers: list[threading.Thread],
        tail: deque[str],
    ) -> StepExit:
        try:
            code = process.wait(launch.timeout)
        except subprocess.TimeoutExpired:
            _kill_group(process.pid)
            code = process.wait(None)
            reason, message = "timeout", f"the step ran longer than {launch.timeout}s"
        else:
            reason, message = self._reason(launch.attempt, code)
        for reader in readers:
            reader.join()
        return StepExit(
            reason=reason, exit_code=code, message=message, stderr_tail="".join(tail)
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

    def cancel(self, session: str | None = None) -> int:
        with self._lock:
            chosen = [
                (attempt, pid)
                for attempt, (owner, pid) in self._running.items()
                if session is None or owner == session
            ]
            self._cancelled.update(attempt for attempt, _ in chosen)
        for _, pid in chosen:
            _kill_group(pid)
        if chosen:
            logger.info("cancelled %d running step(s)", len(chosen))
        return len(chosen)


def _without_master_key(environment: Mapping[str, str]) -> dict[str, str]:
    # Every step forked from the warm parent shares the environment it was
    # started with (a step reads it in /proc/self/environ, whatever its
    # os.environ says): the master key must never be in it.
    return {
        name: value
        for name, value in environment.items()
        if name not in _MASTER_KEY_VARIABLES
    }


def _address_space_limit(limit: int) -> Callable[[], None]:
    def apply() -> None:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    return apply


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def _reader(
    stream: IO[bytes],
    name: str,
    on_output: OutputCallback | None,
    tail: deque[str] | None,
) -> threading.Thread:
    def read() -> None:
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        with stream:
            while chunk := os.read(stream.fileno(), _CHUNK):
                text = decoder.decode(chunk)
                if tail is not None:
                    tail.append(text)
                if on_output is not None and text:
                    on_output(name, text)

    thread = threading.Thread(target=read, name=f"step-{name}", daemon=True)
    thread.start()
    return thread
