"""Byte-level access to the folder or bucket that holds a store.

Two implementations of one small interface: plain ``os`` calls for local paths,
so that a step on the embedded default never pays fsspec's import, and fsspec for
every other URL (``s3://``, ``memory://``, ...). Both offer the one operation the
commit protocol depends on: create a file only if it does not exist, all or
nothing.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import time
import uuid
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

from jobrunner.errors import StoreUnavailable

__all__ = ["Files", "LocalFiles", "open_files"]

logger = logging.getLogger(__name__)

T = TypeVar("T")


class Files(Protocol):
    """What the store needs of a filesystem, with paths relative to its root."""

    url: str

    def read(self, path: str) -> bytes: ...

    def write(self, path: str, data: bytes) -> None: ...

    def create(self, path: str, data: bytes) -> None: ...

    def exists(self, path: str) -> bool: ...

    def list(self, path: str) -> list[str]: ...

    def remove(self, path: str) -> None: ...

    def modified(self, path: str) -> float: ...


class LocalFiles:
    """A folder on the local disk; writes are atomic and durable."""

    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(root)
        self.url = self.root

    def _full(self, path: str) -> str:
        return os.path.join(self.root, path)

    def read(self, path: str) -> bytes:
        with open(self._full(path), "rb") as file:
            return file.read()

    def write(self, path: str, data: bytes) -> None:
        temporary = self._write_temporary(path, data)
        os.replace(temporary, self._full(path))

    def create(self, path: str, data: bytes) -> None:
        # A hard link either appears whole or fails with FileExistsError, so a
        # reader never sees a half-written file and two writers never both win.
        temporary = self._write_temporary(path, data)
        try:
            os.link(temporary, self._full(path))
        finally:
            os.unlink(temporary)

    def _write_temporary(self, path: str, data: bytes) -> str:
        full = self._full(path)
        os.makedirs(os.path.dirname(full), exist_ok=True)
        temporary = f"{full}.{uuid.uuid4().hex}.tmp"
        with open(temporary, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        return temporary

    def exists(self, path: str) -> bool:
        return os.path.exists(self._full(path))

    def list(self, path: str) -> list[str]:
        try:
            names = os.listdir(self._full(path))
        except FileNotFoundError:
            return []
        return sorted(name for name in names if not name.endswith(".tmp"))

    def remove(self, path: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._full(path))

    def modified(self, path: str) -> float:
        return os.stat(self._full(path)).st_mtime


class FsspecFiles:
    """Any fsspec filesystem; transient failures are retried with backoff."""

    def __init__(self, url: str, options: dict[str, Any], attempts: int = 5) -> None:
        import fsspec  # only stores that are not local folders pay for fsspec

        protocol, _, root = url.partition("://")
        try:
            self.fs = fsspec.filesystem(protocol, **options)
        except (ImportError, ValueError) as error:
            raise StoreUnavailable(_missing_filesystem(protocol, error)) from error
        self.root = root.rstrip("/")
        self.url = url
        self.attempts = attempts

    def _full(self, path: str) -> str:
        return f"{self.root}/{path}"

    def _retry(self, action: Callable[[], T], what: str) -> T:
        for attempt in range(1, self.attempts + 1):
            try:
                return action()
            except (FileNotFoundError, FileExistsError, PermissionError):
                raise
            except OSError as error:
                if attempt == self.attempts:
                    raise StoreUnavailable(
                        f"the store {self.url} was unreachable while trying to"
                        f" {what} ({type(error).__name__}) after {attempt} attempts"
                    ) from error
                delay = min(2.0, 0.1 * 2**attempt) * (0.5 + random.random())
                logger.debug("retrying %s in %.2fs after %r", what, delay, error)
                time.sleep(delay)
        raise AssertionError("unreachable")

    def read(self, path: str) -> bytes:
        data: bytes = self._retry(lambda: self.fs.cat_file(self._full(path)), "read")
        return data

    def write(self, path: str, data: bytes) -> None:
        self._retry(lambda: self.fs.pipe_file(self._full(path), data), "write")

    def create(self, path: str, data: bytes) -> None:
        full = self._full(path)
        self._retry(lambda: self.fs.pipe_file(full, data, mode="create"), "commit")

    def exists(self, path: str) -> bool:
        found: bool = self._retry(lambda: self.fs.exists(self._full(path)), "look")
        return found

    def list(self, path: str) -> list[str]:
        full = self._full(path)

        def names() -> list[str]:
            try:
                entries = self.fs.ls(full, detail=False, refresh=True)
            except FileNotFoundError:
                return []
            return sorted(entry.rstrip("/").rsplit("/", 1)[-1] for entry in entries)

        return self._retry(names, "list")

    def remove(self, path: str) -> None:
        def remove() -> None:
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm_file(self._full(path))

        self._retry(remove, "remove")

    def modified(self, path: str) -> float:
        info = self._retry(lambda: self.fs.info(self._full(path)), "look")
        stamp = info.get("LastModified") or info.get("mtime") or info.get("created")
        if hasattr(stamp, "timestamp"):
            return float(stamp.timestamp())
        return float(stamp or 0.0)


def _missing_filesystem(protocol: str, error: Exception) -> str:
    packages = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs"}
    packages.update({"az": "adlfs", "abfs": "adlfs", "abfss": "adlfs"})
    if protocol in packages:
        return f"install {packages[protocol]} to use {protocol}:// stores"
    return f"no filesystem for {protocol}:// stores: {error}"


def open_files(url: str, options: dict[str, Any] | None = None) -> Files:
    """Return the filesystem access for a store URL or local path."""
    if url.startswith("file://"):
        return LocalFiles(url.removeprefix("file://"))
    if "://" not in url:
        return LocalFiles(url)
    return FsspecFiles(url, options or {})
