"""What a one-variable step costs in a session that holds 200 MB.

Run with ``python benchmarks/incremental.py [--repeat N] [--warm]``. A session
holds a ~150 MB numpy array and a ~50 MB dict; a step changes one small
variable. Measured side by side in one run, alternating:

- that step on the 200 MB session: bytes written, wall time and the store
  folder's growth;
- the same step on an empty session (only the small variable);
- the naive baseline: the same namespace built in a module object and saved
  whole with ``dill.dump_module``, as a session that pickles everything would.

The step should write a few hundred bytes and take about as long as on the
empty session: untouched variables are neither loaded nor pickled nor hashed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import types

import dill

from jobrunner import Session
from jobrunner.backends.local import LocalBackend

ARRAY_MB = 150
TABLE_ENTRIES = 600_000  # about 48 MB pickled
SETUP = (
    "import numpy as np\n"
    f"array = np.arange({ARRAY_MB * 2**20 // 8}, dtype=np.float64)\n"
    f"table = {{i: f'{{i:08d}}' * 9 for i in range({TABLE_ENTRIES})}}\n"
    "small = 0"
)
STEP = "small = small + 1"


def _folder_size(path: str) -> int:
    total = 0
    for folder, _, names in os.walk(path):
        total += sum(os.path.getsize(os.path.join(folder, name)) for name in names)
    return total


def _step(session: Session, store: str) -> tuple[float, int, int]:
    """Run the step; return its wall time, bytes written and store growth."""
    before = _folder_size(store)
    started = time.perf_counter()
    result = session.run(STEP)
    elapsed = time.perf_counter() - started
    assert result.ok, result.error
    return elapsed, result.bytes_written, _folder_size(store) - before


def _dump_module(folder: str) -> tuple[float, int, int]:
    """Build the namespace in a module and save it whole with dill.dump_module."""
    module = types.ModuleType("incremental_namespace")
    exec(SETUP, module.__dict__)
    sys.modules[module.__name__] = module
    path = os.path.join(folder, "namespace.pkl")
    try:
        started = time.perf_counter()
        dill.dump_module(path, module=module)
        elapsed = time.perf_counter() - started
    finally:
        del sys.modules[module.__name__]
    size = os.path.getsize(path)
    os.unlink(path)
    return elapsed, size, size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--warm", action="store_true", help="fork steps (warm)")
    options = parser.parse_args()
    backend = LocalBackend(warm=options.warm)
    samples: dict[str, list[tuple[float, int, int]]] = {
        "one-variable step, 200 MB session": [],
        "same step, empty session": [],
        "dill.dump_module of the namespace": [],
    }
    with (
        tempfile.TemporaryDirectory() as big_store,
        tempfile.TemporaryDirectory() as small_store,
    ):
        big = Session("big", store=big_store, backend=backend)
        empty = Session("empty", store=small_store, backend=backend)
        started = time.perf_counter()
        setup = big.run(SETUP)
        assert setup.ok, setup.error
        print(
            f"setup: the 200 MB session's first step wrote"
            f" {setup.bytes_written / 2**20:.1f} MiB in"
            f" {time.perf_counter() - started:.1f}s"
        )
        assert empty.run("small = 0").ok
        try:
            for _ in range(options.repeat):
                cases = list(samples)
                samples[cases[0]].append(_step(big, big_store))
                samples[cases[1]].append(_step(empty, small_store))
                samples[cases[2]].append(_dump_module(big_store))
        finally:
            backend.close()
    _report(samples, options.warm)


def _report(samples: dict[str, list[tuple[float, int, int]]], warm: bool) -> None:
    rows = {
        name: (
            statistics.median(s[0] for s in runs),
            max(s[1] for s in runs),
            max(s[2] for s in runs),
        )
        for name, runs in samples.items()
    }
    names = list(rows)
    step_time, step_bytes, _ = rows[names[0]]
    empty_time = rows[names[1]][0]
    dump_time, dump_bytes, _ = rows[names[2]]
    mode = "warm (fork)" if warm else "spawn (new interpreter)"
    print(f"local backend: {mode}; medians of wall time, maxima of bytes")
    header = (
        f"{'case':<36} {'wall':>9} {'written':>12} {'store grew':>12}"
        f" {'x empty':>8} {'x dump_module':>14}"
    )
    print(header)
    print("-" * len(header))
    for name, (elapsed, written, grew) in rows.items():
        print(
            f"{name:<36} {elapsed * 1000:7.1f}ms {written:>10,d} B {grew:>10,d} B"
            f" {elapsed / empty_time:7.2f}x {elapsed / dump_time:13.3f}x"
        )
    print()
    print(
        f"one-variable step vs empty session: {step_time / empty_time:.2f}x the"
        f" wall time (bound: 2x); wrote {step_bytes:,d} B (bound: 65,536 B)"
    )
    print(
        f"one-variable step vs dill.dump_module: {dump_time / step_time:.1f}x"
        f" faster, {dump_bytes / max(step_bytes, 1):,.0f}x fewer bytes"
    )


if __name__ == "__main__":
    main()
