"""A container run as a local process, and its log."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import threading
import time
from typing import IO

logger = logging.getLogger(__name__)


class PodLog:
    """A container's output, kept as ``(stream, bytes)`` chunks in arrival order.

    Followers wait on it; it is closed when the process and every reader are done.
    """

    def __init__(self) -> None:
        self._chunks: list[tuple[str, bytes]] = []
        self._changed = threading.Condition()
        self.closed = False

    def append(self, stream: str, data: bytes) -> None:
        with self._changed:
            self._chunks.append((stream, data))
            self._changed.notify_all()

    def close(self) -> None:
        with self._changed:
            self.closed = True
            self._changed.notify_all()

    def read(self, start: int, stream: str = "All") -> tuple[bytes, int]:
        """Return the output from chunk ``start`` on, and the next chunk index."""
        with self._changed:
            chunks = self._chunks[start:]
            end = len(self._chunks)
        data = b"".join(d for s, d in chunks if stream in ("All", s))
        return data, end

    def wait(self, start: int, timeout: float) -> bool:
        """Wait until there is output past chunk ``start``; False once closed."""
        with self._changed:
            self._changed.wait_for(
                lambda: len(self._chunks) > start or self.closed, timeout
            )
            return len(self._chunks) > start or not self.closed


def start_reader(log: PodLog, stream: str, pipe: IO[bytes]) -> threading.Thread:
    """Copy a pipe into ``log`` as ``stream`` in a thread, until it closes."""

    def read() -> None:
        # Whole lines only, as the container runtime logs them: a line is
        # never split by the other stream's output.
        pending = b""
        with pipe:
            for data in iter(lambda: os.read(pipe.fileno(), 65536), b""):
                lines, newline, pending = (pending + data).rpartition(b"\n")
                if newline:
                    log.append(stream, lines + newline)
        if pending:
            log.append(stream, pending)

    thread = threading.Thread(target=read, name=f"kubeserver-{stream}", daemon=True)
    thread.start()
    return thread


class ContainerProcess:
    """One container's command, run in its own process group.

    Args:
        argv: The command and its arguments.
        env: The complete environment.
        cwd: The working directory.
        log: Where stdout and stderr go, tagged ``Stdout`` and ``Stderr``.
    """

    def __init__(
        self, argv: list[str], env: dict[str, str], cwd: str, log: PodLog
    ) -> None:
        self.log = log
        self.started_at = time.monotonic()
        self._process = subprocess.Popen(
            argv,
            env=env,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        assert self._process.stdout and self._process.stderr
        self._readers = [
            start_reader(log, "Stdout", self._process.stdout),
            start_reader(log, "Stderr", self._process.stderr),
        ]
        # A local process has no memory limit: only an injected fault OOM-kills.
        self.oom_killed = False
        logger.debug("started pid %d: %s", self._process.pid, argv)

    @property
    def pid(self) -> int:
        return self._process.pid

    @property
    def alive(self) -> bool:
        return self._process.poll() is None

    def wait(self, timeout: float) -> int | None:
        """Return the exit code, or None if still running after ``timeout``."""
        try:
            code = self._process.wait(timeout)
        except subprocess.TimeoutExpired:
            return None
        self._finish()
        # Kubernetes reports death by signal N as exit code 128 + N.
        return 128 - code if code < 0 else code

    def _finish(self) -> None:
        # A container ends with its main process: leftovers would hold the pipes.
        self.signal(signal.SIGKILL)
        for reader in self._readers:
            reader.join(timeout=5)
        self.log.close()

    def signal(self, signum: int) -> None:
        """Send ``signum`` to the whole process group."""
        # The group is gone once every process in it has been reaped.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._process.pid, signum)

    def kill(self) -> int:
        """SIGKILL the process group and return the exit code Kubernetes reports."""
        self.signal(signal.SIGKILL)
        self._process.wait()
        self._finish()
        return 137

    def terminate(self, grace: float) -> int:
        """SIGTERM, wait up to ``grace`` seconds, then SIGKILL; return the exit code."""
        self.signal(signal.SIGTERM)
        code = self.wait(grace)
        return self.kill() if code is None else code
