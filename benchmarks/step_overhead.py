"""What a trivial step costs, as a multiple of starting Python itself.

Run with ``python benchmarks/step_overhead.py [--repeat N]``. Everything is
measured side by side in one run, alternating, so that the ratios hold on a
shared, noisy machine even when the absolute times do not.
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=15)
    repeat = parser.parse_args().repeat
    with tempfile.TemporaryDirectory() as store:
        plain = Session("plain", store=store)
        plain.run(PLAIN)
        code = Session("code", store=store)
        code.run(CODE)
        Session("cli", store=store).run(PLAIN)
        cases = {
            "python -c pass": _python_pass,
            "library step, plain data": _library_step(plain),
            "library step, functions and classes": _library_step(code),
            "  ... calling a session function": _library_step(code, "y = scale(3)"),
            "CLI step, plain data": _cli_step(store),
        }
        times: dict[str, list[float]] = {name: [] for name in cases}
        for _ in range(repeat):
            for name, action in cases.items():
                times[name].append(_timed(action))
    base = statistics.median(times["python -c pass"])
    print(f"{'case':<38} {'median':>9} {'x python -c pass':>17}")
    for name, samples in times.items():
        median = statistics.median(samples)
        print(f"{name:<38} {median * 1000:7.1f}ms {median / base:16.1f}x")


if __name__ == "__main__":
    main()
