"""What a trivial step costs, against starting Python and a Jupyter kernel.

Run with ``python benchmarks/step_overhead.py [--repeat N]``. Everything is
measured side by side in one run, alternating, so that the ratios hold on a
shared, noisy machine even when the absolute times do not. The Jupyter kernel
round trip (``x = x + 1`` on a running ipykernel, through jupyter_client) is
measured when ipykernel and jupyter_client are installed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

from jobrunner import Session
from jobrunner.backends.local import LocalBackend

PLAIN = "numbers = list(range(100))\nname = 'small'\nconfig = {'a': 1, 'b': [1, 2]}"
CODE = (
    "import math\nclass Shape:\n    def area(self): return 0\n"
    "def scale(x): return x * factor\nfactor = 2\nsquare = lambda x: x * x"
)
STEP = "x = 1"


def _timed(action: Callable[[], object]) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def _python_pass() -> None:
    subprocess.run([sys.executable, "-c", "pass"], check=True)


def _cli_step(store: str) -> Callable[[], None]:
    command = [sys.executable, "-m", "jobrunner.cli", "run", "-s", "cli", STEP]
    environment = {**os.environ, "JOBRUNNER_STORE": store}

    def run() -> None:
        subprocess.run(command, check=True, env=environment, capture_output=True)

    return run


def _library_step(session: Session, step: str = STEP) -> Callable[[], None]:
    def run() -> None:
        result = session.run(step)
        assert result.ok, result.error

    return run


class _Kernel:
    """A running ipykernel and a client, for the round trip of one cell."""

    def __init__(self) -> None:
        os.environ.setdefault("JUPYTER_PLATFORM_DIRS", "1")
        from jupyter_client.manager import start_new_kernel

        self.manager, self.client = start_new_kernel(kernel_name="python3")
        self.round_trip("x = 0")

    def round_trip(self, code: str = "x = x + 1") -> None:
        reply = self.client.execute_interactive(code, timeout=30, output_hook=_ignore)
        assert reply["content"]["status"] == "ok"

    def close(self) -> None:
        self.client.stop_channels()
        self.manager.shutdown_kernel(now=True)


def _ignore(message: object) -> None:
    pass


def _kernel() -> _Kernel | None:
    try:
        return _Kernel()
    except ImportError:
        print("(ipykernel or jupyter_client is not installed: no kernel figures)")
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=15)
    repeat = parser.parse_args().repeat
    kernel = _kernel()
    warm_backend = LocalBackend(warm=True)
    with tempfile.TemporaryDirectory() as store:
        plain = Session("plain", store=store)
        code = Session("code", store=store)
        warm = Session("warm", store=store, backend=warm_backend)
        for session, setup in ((plain, PLAIN), (code, CODE), (warm, PLAIN)):
            session.run(setup)
        Session("cli", store=store).run(PLAIN)
        cases = {
            "python -c pass": _python_pass,
            "library step, plain data": _library_step(plain),
            "library step, functions and classes": _library_step(code),
            "  ... calling a session function": _library_step(code, "y = scale(3)"),
            "CLI step, plain data": _cli_step(store),
            "warm library step, plain data": _library_step(warm),
        }
        if kernel is not None:
            cases["jupyter kernel round trip"] = kernel.round_trip
        times: dict[str, list[float]] = {name: [] for name in cases}
        try:
            for _ in range(repeat):
                for name, action in cases.items():
                    times[name].append(_timed(action))
        finally:
            warm_backend.close()
            if kernel is not None:
                kernel.close()
    _report(times)


def _report(times: dict[str, list[float]]) -> None:
    medians = {name: statistics.median(samples) for name, samples in times.items()}
    python = medians["python -c pass"]
    kernel = medians.get("jupyter kernel round trip")
    header = f"{'case':<38} {'median':>9} {'x python -c pass':>17}"
    print(header + (f" {'x kernel':>9}" if kernel else ""))
    for name, median in medians.items():
        line = f"{name:<38} {median * 1000:7.1f}ms {median / python:16.1f}x"
        print(line + (f" {median / kernel:8.1f}x" if kernel else ""))


if __name__ == "__main__":
    main()
