"""Byte-level access to the folder or bucket that holds a store.

Two implementations of one small interface: plain ``os`` calls for local paths,
so that a step on the embedded default never pays fsspec's import, and fsspec for
every other URL (``s3://``, ``memory://``, ...). Both offer the one operation the
commit protocol depends on: create a file only if it does not exist, all or
nothing. Large blobs go through as lists of buffers, never joined in memory.
"""

from __future__ import annotations

import contextlib
import io
import logging
import mmap
import os
import random
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeVar

from jobrunner.errors import StoreUnavailable

__all__ = ["Files", "FsspecFiles", "LocalFiles", "open_files"]

logger = logging.getLogger(__name__)

T = TypeVar("T")
Buffer = bytes | bytearray | memoryview
ChunkCallback = Callable[[memoryview], None]


class Files(Protocol):
    """What the store needs of a filesystem, with paths relative to its root."""

    url: str

    def read(self, path: str) -> bytes: ...

    def read_into(self, path: str, chunk: int, on_chunk: ChunkCallback) -> memoryview:
        """Read a whole file into new private, writable memory, passing each
        chunk as it lands."""

    def write(self, path: str, data: bytes, *, durable: bool = True) -> None:
        """Replace a file whole; ``durable=False`` skips waiting for the disk."""

    def write_parts(self, path: str, parts: Sequence[Buffer]) -> None:
        """Write the concatenation of ``parts``, all or nothing."""

    def create(self, path: str, data: bytes) -> None: ...

    def exists(self, path: str) -> bool: ...

    def refresh(self, path: str) -> bool:
        """Mark an existing file as just used; return False if there is none."""

    def list(self, path: str) -> list[str]: ...

    def remove(self, path: str) -> None: ...

    def modified(self, path: str) -> float: ...


def _size(parts: Sequence[Buffer]) -> int:
    return sum(memoryview(part).nbytes for part in parts)


def private_memory(size: int) -> memoryview:
    """Return ``size`` bytes of new, writable memory that nothing else shares.

    Large buffers are anonymous memory maps: unlike a bytearray, they are not
    zero-filled first, a pass over the whole blob that a read then repeats.
    """
    if size < 2**20:
        return memoryview(bytearray(size))
    return memoryview(mmap.mmap(-1, size))


def _in_chunks(buffer: memoryview, chunk: int, on_chunk: ChunkCallback) -> None:
    view = memoryview(buffer)
    for start in range(0, len(buffer), chunk):
        on_chunk(view[start : start + chunk])


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

    def read_into(self, path: str, chunk: int, on_chunk: ChunkCallback) -> memoryview:
        with open(self._full(path), "rb", buffering=0) as file:
            view = private_memory(os.fstat(file.fileno()).st_size)
            for start in range(0, view.nbytes, chunk):
                piece = view[start : start + chunk]
                got = 0
                while got < piece.nbytes:
                    count = file.readinto(piece[got:])
                    if not count:
                        raise OSError(f"{path} was shortened while it was read")
                    got += count
                on_chunk(piece)
        return view

    def write(self, path: str, data: bytes, *, durable: bool = True) -> None:
        temporary = self._write_temporary(path, [data], durable=durable)
        os.replace(temporary, self._full(path))

    def write_parts(self, path: str, parts: Sequence[Buffer]) -> None:
        temporary = self._write_temporary(path, parts)
        os.replace(temporary, self._full(path))

    def create(self, path: str, data: bytes) -> None:
        # A hard link either appears whole or fails with FileExistsError, so a
        # reader never sees a half-written file and two writers never both win.
        temporary = self._write_temporary(path, [data])
        try:
            os.link(temporary, self._full(path))
        finally:
            os.unlink(temporary)

    def _write_temporary(
        self, path: str, parts: Sequence[Buffer], *, durable: bool = True
    ) -> str:
        full = self._full(path)
        os.makedirs(os.path.dirname(full), exist_ok=True)
        temporary = f"{full}.{uuid.uuid4().hex}.tmp"
        try:
            with open(temporary, "wb", buffering=0) as file:
                for part in parts:
                    view = memoryview(part)
                    while view.nbytes:
                        view = view[file.write(view) :]
                if durable:
                    os.fsync(file.fileno())
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise
        return temporary

    def exists(self, path: str) -> bool:
        return os.path.exists(self._full(path))

    def refresh(self, path: str) -> bool:
        try:
            os.utime(self._full(path))
        except FileNotFoundError:
            return False
        return True

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


# S3 settings that make a store that is down fail in seconds rather than minutes.
# jobrunner retries whole operations itself, with backoff (FsspecFiles._retry):
# retries in the layers below would multiply with its own, so they are off.
# Explicit options of the store override these.
_S3_DEFAULTS: dict[str, Any] = {
    "config_kwargs": {
        "connect_timeout": 5,
        "read_timeout": 60,
        "retries": {"max_attempts": 1, "mode": "standard"},
    },
}
# How many times s3fs itself tries a request that failed in transit.
_S3FS_TRIES = 1
# Objects up to this size are sent in one PUT; larger ones in parts this size.
_S3_PART = 32 * 2**20


def _with_defaults(protocol: str, options: dict[str, Any]) -> dict[str, Any]:
    if protocol not in ("s3", "s3a"):
        return options
    merged = {**_S3_DEFAULTS, **options}
    merged["config_kwargs"] = {
        **_S3_DEFAULTS["config_kwargs"],
        **options.get("config_kwargs", {}),
    }
    return merged


def _transient_errors() -> tuple[type[BaseException], ...]:
    """The exceptions, besides OSError, that mean the store could not be reached."""
    found: list[type[BaseException]] = [OSError, TimeoutError]
    if "botocore" in sys.modules:
        from botocore.exceptions import BotoCoreError

        found.append(BotoCoreError)
    if "aiohttp" in sys.modules:
        from aiohttp import ClientError

        found.append(ClientError)
    return tuple(found)


class _PartsReader(io.RawIOBase):
    """A seekable file over a byte range of a list of buffers, copying nothing."""

    def __init__(self, parts: Sequence[Buffer], start: int, end: int) -> None:
        self.views = [memoryview(part).cast("B") for part in parts]
        self.start, self.end, self.position = start, end, 0

    def __len__(self) -> int:
        return self.end - self.start

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.position, io.SEEK_END: len(self)}
        self.position = min(max(base[whence] + offset, 0), len(self))
        return self.position

    def readinto(self, buffer: Any) -> int:
        target = memoryview(buffer).cast("B")
        wanted = min(target.nbytes, len(self) - self.position)
        done = 0
        offset = self.start + self.position
        for view in self.views:
            if done == wanted:
                break
            if offset >= view.nbytes:
                offset -= view.nbytes
                continue
            piece = view[offset : offset + wanted - done]
            target[done : done + piece.nbytes] = piece
            done += piece.nbytes
            offset = 0
        self.position += done
        return done


class FsspecFiles:
    """Any fsspec filesystem; transient failures are retried with backoff.

    Args:
        url: The store's URL, such as ``s3://bucket/prefix``.
        options: The filesystem's options; for S3, short timeouts and few
            retries of its own are added unless given.
        attempts: How many times an operation is tried before the store is
            reported unreachable.
    """

    def __init__(self, url: str, options: dict[str, Any], attempts: int = 5) -> None:
        import fsspec  # only stores that are not local folders pay for fsspec

        protocol, _, root = url.partition("://")
        try:
            self.fs = fsspec.filesystem(protocol, **_with_defaults(protocol, options))
        except (ImportError, ValueError) as error:
            raise StoreUnavailable(_missing_filesystem(protocol, error)) from error
        self.root = root.rstrip("/")
        self.url = url
        self.attempts = attempts
        self._s3 = hasattr(self.fs, "_call_s3")
        if self._s3:
            self.fs.retries = _S3FS_TRIES
        self._transient = _transient_errors()

    def _full(self, path: str) -> str:
        return f"{self.root}/{path}"

    def _retry(self, action: Callable[[], T], what: str) -> T:
        for attempt in range(1, self.attempts + 1):
            try:
                return action()
            except (FileNotFoundError, FileExistsError, PermissionError):
                raise
            except self._transient as error:
                if attempt == self.attempts:
                    raise StoreUnavailable(
                        f"the store {self.url} was unreachable while trying to"
                        f" {what} ({type(error).__name__}) after {attempt} attempts"
                    ) from error
                delay = min(2.0, 0.1 * 2**attempt) * (0.5 + random.random())
                logger.debug(
                    "retrying to %s in %.2fs after %s",
                    what,
                    delay,
                    type(error).__name__,
                )
                time.sleep(delay)
        raise AssertionError("unreachable")

    def read(self, path: str) -> bytes:
        data: bytes = self._retry(lambda: self.fs.cat_file(self._full(path)), "read")
        return data

    def read_into(self, path: str, chunk: int, on_chunk: ChunkCallback) -> memoryview:
        full = self._full(path)
        if not self._s3:
            buffer = memoryview(bytearray(self.read(path)))
            _in_chunks(buffer, chunk, on_chunk)
            return buffer
        # Chunks are handed on only once the whole read succeeded, since a
        # retried read starts again from the beginning.
        # Ranges as large as s3fs's own reads: each GET costs the server a setup.
        ranges = max(chunk, self.fs.default_block_size)
        buffer = self._retry(lambda: self._s3_read(full, ranges), "read")
        _in_chunks(buffer, chunk, on_chunk)
        return buffer

    def _s3_read(self, full: str, chunk: int) -> memoryview:
        from fsspec.asyn import sync

        async def read() -> memoryview:
            import asyncio

            bucket, key, _ = self.fs.split_path(full)
            head = await self.fs._call_s3("head_object", Bucket=bucket, Key=key)
            view = buffer = private_memory(head["ContentLength"])
            limit = asyncio.Semaphore(self.fs.max_concurrency)

            async def fetch(start: int) -> None:
                end = min(start + chunk, len(buffer)) - 1
                async with limit:
                    response = await self.fs._call_s3(
                        "get_object",
                        Bucket=bucket,
                        Key=key,
                        Range=f"bytes={start}-{end}",
                        IfMatch=head["ETag"],
                    )
                    try:
                        data = await response["Body"].read()
                    finally:
                        response["Body"].close()
                if len(data) != end + 1 - start:
                    raise OSError(f"a short read of {full}")
                view[start : end + 1] = data

            await asyncio.gather(*(fetch(s) for s in range(0, len(buffer), chunk)))
            return buffer

        result: memoryview = sync(self.fs.loop, read)
        return result

    def write(self, path: str, data: bytes, *, durable: bool = True) -> None:
        self.write_parts(path, [data])  # an object store's put is durable anyway

    def write_parts(self, path: str, parts: Sequence[Buffer]) -> None:
        full = self._full(path)
        if self._s3:
            self._retry(lambda: self._s3_write(full, parts), "write")
        else:
            data = parts[0] if len(parts) == 1 else b"".join(parts)
            self._retry(lambda: self.fs.pipe_file(full, bytes(data)), "write")

    def _s3_write(self, full: str, parts: Sequence[Buffer]) -> None:
        # Bodies are file objects over the caller's buffers: s3fs would slice
        # (copy) a bytes body, and aiohttp warns about sending large ones.
        from fsspec.asyn import sync

        size = _size(parts)
        bucket, key, _ = self.fs.split_path(full)

        async def put() -> None:
            await self.fs._call_s3(
                "put_object", Bucket=bucket, Key=key, Body=_PartsReader(parts, 0, size)
            )

        async def put_in_parts() -> None:
            import asyncio

            upload = await self.fs._call_s3(
                "create_multipart_upload", Bucket=bucket, Key=key
            )
            limit = asyncio.Semaphore(self.fs.max_concurrency)

            async def send(number: int, start: int) -> dict[str, Any]:
                body = _PartsReader(parts, start, min(start + _S3_PART, size))
                async with limit:
                    sent = await self.fs._call_s3(
                        "upload_part",
                        Bucket=bucket,
                        Key=key,
                        PartNumber=number,
                        UploadId=upload["UploadId"],
                        Body=body,
                    )
                return {"PartNumber": number, "ETag": sent["ETag"]}

            try:
                starts = range(0, size, _S3_PART)
                sent = await asyncio.gather(
                    *(send(n, s) for n, s in enumerate(starts, 1))
                )
                await self.fs._call_s3(
                    "complete_multipart_upload",
                    Bucket=bucket,
                    Key=key,
                    UploadId=upload["UploadId"],
                    MultipartUpload={"Parts": list(sent)},
                )
            except BaseException:
                await self.fs._abort_mpu(bucket, key, upload["UploadId"])
                raise

        sync(self.fs.loop, put if size <= _S3_PART else put_in_parts)
        self.fs.invalidate_cache(full)

    def create(self, path: str, data: bytes) -> None:
        full = self._full(path)

        def create() -> None:
            try:
                self.fs.pipe_file(full, data, mode="create")
            except FileExistsError:
                # A request whose answer was lost may have been retried (here or
                # in the client below) after it created the object: the object
                # is then ours, byte for byte, and the create succeeded.
                if self._holds(full, data):
                    logger.debug("a retried create of %s had succeeded", path)
                    return
                raise

        self._retry(create, "commit")

    def _holds(self, full: str, data: bytes) -> bool:
        try:
            found: bytes = self._retry(lambda: self.fs.cat_file(full), "read")
        except FileNotFoundError:
            return False
        return found == data

    def exists(self, path: str) -> bool:
        full = self._full(path)

        def look() -> bool:
            # Past the listing cache that list() fills (s3fs answers exists()
            # and info() from it): other processes add files, such as the next
            # manifest, and a cached answer would make a session's head stale.
            self.fs.invalidate_cache(full)
            return bool(self.fs.exists(full))

        return self._retry(look, "look")

    def refresh(self, path: str) -> bool:
        full = self._full(path)

        def touch() -> bool:
            self.fs.invalidate_cache(full)
            if not self.fs.exists(full):
                return False
            try:
                self.fs.touch(full, truncate=False)
            except (NotImplementedError, ValueError):
                if hasattr(self.fs, "setxattr"):
                    # S3 cannot touch an object; copying it onto itself with
                    # new metadata renews its time without sending its bytes.
                    self.fs.setxattr(full, jobrunner_used=str(int(time.time())))
                else:
                    self.fs.pipe_file(full, self.fs.cat_file(full))
            return True

        return bool(self._retry(touch, "refresh"))

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
        full = self._full(path)

        def look() -> Any:
            self.fs.invalidate_cache(full)  # as in exists()
            return self.fs.info(full)

        info = self._retry(look, "look")
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
