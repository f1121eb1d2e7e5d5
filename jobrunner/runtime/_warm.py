"""A warm parent that forks a fresh process for every step.

Started as ``python -m jobrunner.runtime._warm --socket PATH`` by the local
backend's warm mode. It imports the step runtime once, then waits on a Unix
socket. For each request it forks a child that runs the runtime's ``main`` with
the request's arguments, exactly as ``python -m jobrunner.runtime`` would, and
exits when the step ends. The parent never runs a step and never loads a
session's state, so a child holds nothing of any other session or step.

One request per connection: the client sends a JSON request with the write ends
of its stdout and stderr pipes attached (SCM_RIGHTS); the parent answers
``{"pid": N}`` once the child runs, then ``{"exit": CODE}`` when it has reaped
it (a negative code is the signal that killed it). The parent is single-threaded
(forking from a threaded process can deadlock the child) and exits when its
stdin, the client's lifeline, closes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import selectors
import signal
import socket
import sys
from typing import Any

from jobrunner.runtime.__main__ import main as runtime_main

_MAX_REQUEST = 1024 * 1024


def _preload() -> None:
    # Paid once here instead of in every step that pickles session functions.
    import dill  # noqa: F401


def _die_with_parent() -> None:
    try:
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: an orphaned step still ends when its code does


def _child(request: dict[str, Any], stdout: int, stderr: int) -> None:
    """Become the step's process; never returns."""
    code = 1
    try:
        os.setsid()
        _die_with_parent()
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.set_wakeup_fd(-1)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.dup2(stdout, 1)
        os.dup2(stderr, 2)
        if request.get("cwd"):
            os.chdir(request["cwd"])
        os.environ.update(request.get("environment", {}))
        limit = request.get("memory_limit")
        if limit:
            import resource

            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        code = runtime_main(request["arguments"])
    except SystemExit as exit:
        code = exit.code if isinstance(exit.code, int) else 1
    except BaseException as error:  # noqa: BLE001 - reported, then the child ends
        sys.stderr.write(f"jobrunner: the step's process failed: {error!r}\n")
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _exit_code(status: int) -> int:
    if os.WIFSIGNALED(status):
        return -os.WTERMSIG(status)
    return os.WEXITSTATUS(status)


class _Parent:
    def __init__(self, path: str) -> None:
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        self.listener.listen(64)
        self.children: dict[int, socket.socket] = {}
        self.wakeup_read, wakeup_write = os.pipe()
        os.set_blocking(wakeup_write, False)
        signal.set_wakeup_fd(wakeup_write)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.listener, selectors.EVENT_READ, "request")
        self.selector.register(self.wakeup_read, selectors.EVENT_READ, "child")
        self.selector.register(sys.stdin.fileno(), selectors.EVENT_READ, "lifeline")

    def serve(self) -> None:
        while True:
            for key, _ in self.selector.select(timeout=5.0):
                if key.data == "lifeline" and not os.read(key.fd, 4096):
                    return
                if key.data == "child":
                    os.read(self.wakeup_read, 4096)
                if key.data == "request":
                    self._start(self.listener.accept()[0])
            self._reap()

    def _start(self, connection: socket.socket) -> None:
        try:
            data, fds, _, _ = socket.recv_fds(connection, _MAX_REQUEST, 2)
            request = json.loads(data)
        except (OSError, ValueError):
            connection.close()
            return
        if len(fds) != 2:
            connection.close()
            return
        sys.stdout.flush()
        pid = os.fork()
        if pid == 0:
            self.listener.close()
            connection.close()
            _child(request, *fds)
        for fd in fds:
            os.close(fd)
        self.children[pid] = connection
        self._send(connection, {"pid": pid})

    def _reap(self) -> None:
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            connection = self.children.pop(pid, None)
            if connection is not None:
                self._send(connection, {"exit": _exit_code(status)})
                connection.close()

    @staticmethod
    def _send(connection: socket.socket, message: dict[str, int]) -> None:
        # A client that went away gets no answer; its child is reaped all the same.
        with contextlib.suppress(OSError):
            connection.sendall(json.dumps(message).encode() + b"\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobrunner.runtime._warm")
    parser.add_argument("--socket", required=True, help="the Unix socket to serve")
    arguments = parser.parse_args(argv)
    _preload()
    parent = _Parent(arguments.socket)
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    parent.serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
