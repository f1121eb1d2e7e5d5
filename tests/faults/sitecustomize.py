"""Kill points for the crash tests: SIGKILL a step's process at a chosen moment.

This folder goes on the PYTHONPATH of step processes only (tests/test_crash.py
puts it there); the test process itself never imports it. When such a process
imports ``jobrunner.store``, the checkpoint store's methods are wrapped so that
the process kills itself, with SIGKILL and no clean-up, at the point named by
``$JOBRUNNER_TEST_KILL`` (``<point>:<n>``, the n-th time the point is reached):

- ``load:<n>``: while loading, once the n-th blob has been read and verified
  and before the namespace gets it;
- ``blob:<n>``: once the n-th blob of the new checkpoint has been written;
- ``commit:1``: after every blob, just before the manifest is created;
- ``head:1``: after the manifest was created, before the HEAD hint is written;
- ``record:1``: after the commit, before the attempt's result is recorded.

The variable is read each time a point is reached, never at import: the warm
parent runs this file when it starts, before any request, and the children it
forks get their request's environment only afterwards. Counts are per process
for the same reason (a fork starts from zero, whatever its parent counted).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import signal
import sys
from collections.abc import Sequence
from types import ModuleType
from typing import Any

VARIABLE = "JOBRUNNER_TEST_KILL"
POINTS = ("load", "blob", "commit", "head", "record")
_STORE_MODULE = "jobrunner.store"

_counts: dict[str, int] = {}
_counted_in = 0


def _reached(point: str) -> None:
    """Count one passage through ``point``; die if it is the chosen one."""
    global _counted_in
    chosen, _, nth = os.environ.get(VARIABLE, "").partition(":")
    if chosen != point:
        return
    if _counted_in != os.getpid():
        _counts.clear()
        _counted_in = os.getpid()
    _counts[point] = _counts.get(point, 0) + 1
    if _counts[point] == int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)


class _Files:
    """The store's file access, with a kill point before the HEAD hint's write."""

    def __init__(self, files: Any) -> None:
        self._files = files

    def __getattr__(self, name: str) -> Any:
        return getattr(self._files, name)

    def write(self, path: str, data: bytes, **options: Any) -> None:
        if path.endswith("/HEAD"):
            _reached("head")
        self._files.write(path, data, **options)


def _wrap_store(module: ModuleType) -> None:
    store = module.CheckpointStore
    init, read_blob, write_blob = store.__init__, store.read_blob, store.write_blob
    commit, record = store.commit, store.record

    def __init__(self: Any, *args: Any, **options: Any) -> None:
        init(self, *args, **options)
        self.files = _Files(self.files)

    def read_blob_then_die(self: Any, digest: str, **names: Any) -> Any:
        data = read_blob(self, digest, **names)
        _reached("load")
        return data

    def write_blob_then_die(self: Any, data: Any, digest: Any = None) -> int:
        written: int = write_blob(self, data, digest)
        _reached("blob")
        return written

    def commit_after_death(self: Any, manifest: Any) -> None:
        _reached("commit")
        commit(self, manifest)

    def record_after_death(self: Any, result: Any) -> None:
        _reached("record")
        record(self, result)

    store.__init__ = __init__
    store.read_blob = read_blob_then_die
    store.write_blob = write_blob_then_die
    store.commit = commit_after_death
    store.record = record_after_death


class _Loader(importlib.abc.Loader):
    def __init__(self, loader: importlib.abc.Loader) -> None:
        self._loader = loader

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> Any:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._loader.exec_module(module)
        _wrap_store(module)


class _Finder(importlib.abc.MetaPathFinder):
    """Wraps the store as it is imported; the runtime is left to import it."""

    def find_spec(
        self, name: str, path: Sequence[str] | None, target: Any = None
    ) -> importlib.machinery.ModuleSpec | None:
        if name != _STORE_MODULE:
            return None
        for finder in sys.meta_path:
            if finder is self:
                continue
            spec = finder.find_spec(name, path, target)  # type: ignore[attr-defined]
            if spec is not None and spec.loader is not None:
                spec.loader = _Loader(spec.loader)
                return spec
        return None


sys.meta_path.insert(0, _Finder())
