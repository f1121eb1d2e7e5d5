"""How fast the step runtime saves and loads checkpoints, against raw I/O.

Run: ``python benchmarks/store_throughput.py`` (starts its own moto S3 server).

For a 200 MB numpy array, on a local folder and on S3 (moto's server over HTTP
on loopback), it times the runtime's save path (``save_namespace`` plus the
store's blob writes) and load path (the store's verified blob reads plus
unpickling), and the raw operations on the same bytes: a write and fsync and a
read of a local file, and s3fs ``pipe_file``/``cat_file`` to the same server.
For a dict of a million small items it times the save path against the
standard library's C pickler plus a raw write. Ratios are raw time divided by
jobrunner's time for the array (higher is better, 1.0 is raw speed), and
jobrunner's time divided by the C pickler's for the dict (lower is better).
"""

from __future__ import annotations

import argparse
import os
import pickle
import statistics
import tempfile
import time
import types
import uuid
from collections.abc import Callable
from typing import Any

import numpy as np

from jobrunner.runtime._namespace import Loader, save_namespace
from jobrunner.store import CheckpointStore

MB = 2**20


def _timed(action: Callable[[], Any], repeat: int) -> float:
    """Return the median wall time of ``repeat`` runs of ``action``."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        action()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _namespace(**values: Any) -> dict[str, Any]:
    namespace = types.ModuleType("__main__").__dict__
    namespace.update(values)
    return namespace


class Bench:
    """Times one store: the runtime's paths and the raw operations."""

    def __init__(self, store: CheckpointStore, raw: RawIO) -> None:
        self.store = store
        self.raw = raw
        self.digests: list[str] = []

    def save(self, namespace: dict[str, Any], name: str) -> None:
        saved = save_namespace(namespace, [name])
        for blob in saved.blobs:
            self.store.write_blob(blob.data, blob.digest)
        self.digests = [blob.digest for blob in saved.blobs]
        self.entries = saved.entries(namespace)

    def load(self, name: str) -> Any:
        namespace = _namespace()
        loader = Loader(
            namespace,
            self.entries,
            {},
            lambda digest, what: self.store.read_blob(digest, name=what),
        )
        loader.load([name])
        return namespace[name]


class RawIO:
    """The raw operations a store's save and load are measured against."""

    def write(self, data: bytes) -> None:
        raise NotImplementedError

    def read(self) -> bytes:
        raise NotImplementedError


class LocalRaw(RawIO):
    def __init__(self, folder: str) -> None:
        self.folder = folder
        self.path = ""

    def write(self, data: Any) -> None:
        self.path = os.path.join(self.folder, uuid.uuid4().hex)
        with open(self.path, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())

    def read(self) -> bytes:
        with open(self.path, "rb") as file:
            return file.read()


class S3Raw(RawIO):
    def __init__(self, fs: Any, bucket: str) -> None:
        self.fs = fs
        self.bucket = bucket
        self.path = ""

    def write(self, data: Any) -> None:
        self.path = f"{self.bucket}/raw/{uuid.uuid4().hex}"
        self.fs.pipe_file(self.path, data)

    def read(self) -> bytes:
        data: bytes = self.fs.cat_file(self.path)
        return data


def _array_rows(bench: Bench, size_mb: int, repeat: int) -> tuple[float, ...]:
    array = np.random.default_rng(0).random(size_mb * MB // 8)
    raw_bytes = array.tobytes()
    counter = iter(range(10**9))

    def save() -> None:
        array[0] = next(counter)  # new content each time: no blob is reused
        bench.save(_namespace(array=array), "array")

    raw_save = _timed(lambda: bench.raw.write(raw_bytes), repeat)
    raw_load = _timed(bench.raw.read, repeat)
    ours_save = _timed(save, repeat)
    loaded = bench.load("array")
    assert np.array_equal(loaded, array) and loaded.flags.writeable
    ours_load = _timed(lambda: bench.load("array"), repeat)
    return raw_save, ours_save, raw_load, ours_load


def _dict_rows(bench: Bench, items: int, repeat: int) -> tuple[float, float]:
    values = {f"key{i}": (i, f"value {i}") for i in range(items)}
    counter = iter(range(10**9))

    def raw() -> None:
        values["key0"] = (next(counter), "")
        bench.raw.write(pickle.dumps(values, protocol=5))

    def ours() -> None:
        values["key0"] = (next(counter), "")
        bench.save(_namespace(values=values), "values")

    return _timed(raw, repeat), _timed(ours, repeat)


def _print_array(name: str, size_mb: int, rows: tuple[float, ...]) -> None:
    raw_save, ours_save, raw_load, ours_load = rows
    for what, raw, ours in (
        ("save", raw_save, ours_save),
        ("load", raw_load, ours_load),
    ):
        print(
            f"{name:6} {size_mb} MB array  {what}: raw {raw:6.3f}s"
            f" ({size_mb / raw:5.0f} MB/s)  jobrunner {ours:6.3f}s"
            f" ({size_mb / ours:5.0f} MB/s)  ratio {raw / ours:4.2f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=200)
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=3)
    arguments = parser.parse_args()

    with tempfile.TemporaryDirectory(dir=".") as folder:
        local = Bench(CheckpointStore(os.path.join(folder, "store")), LocalRaw(folder))
        rows = _array_rows(local, arguments.size_mb, arguments.repeat)
        _print_array("local", arguments.size_mb, rows)
        raw_dict, ours_dict = _dict_rows(local, arguments.items, arguments.repeat)
        print(
            f"local  dict of {arguments.items} items save: pickle.dumps + write"
            f" {raw_dict:6.3f}s  jobrunner {ours_dict:6.3f}s"
            f"  jobrunner/pickle {ours_dict / raw_dict:4.2f}"
        )

    for name, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        os.environ.setdefault(name, value)
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        import s3fs

        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        fs = s3fs.S3FileSystem(endpoint_url=endpoint, skip_instance_cache=True)
        fs.mkdir("bench")
        store = CheckpointStore("s3://bench/store", options={"endpoint_url": endpoint})
        s3 = Bench(store, S3Raw(fs, "bench"))
        _print_array("s3", arguments.size_mb, _array_rows(s3, arguments.size_mb, 2))
    finally:
        server.stop()


if __name__ == "__main__":
    import logging

    # moto's server logs every request; the figures are what this prints.
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    main()
