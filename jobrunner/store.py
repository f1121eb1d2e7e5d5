"""The checkpoint store: the one owner of jobrunner's on-disk format.

Layout under the store's root (a local folder or any fsspec URL)::

    blobs/<2 hex>/<digest>                  pickled variables, content-addressed
    sessions/<id>/steps/<step>.json         manifests: one per committed step
    sessions/<id>/attempts/<attempt>.json   the result of every attempt
    sessions/<id>/requests/<attempt>.json   the code an attempt was asked to run
    sessions/<id>/HEAD                      a hint: the last committed step
    schedules/<name>/...                    a scheduled notebook and its runs

A manifest maps each variable to the digest of the blob that holds it. Step
``n + 1`` is committed by creating its manifest only if it does not exist, so of
two steps racing on one session exactly one commits. Blobs are immutable and never
read before their digest matches the manifest, and manifests are verified
(session, step and, with a signing key, an HMAC over their whole content) before
anything they list is unpickled.

History is never rewritten: a rollback or a fork commits a new manifest that
lists the blobs of an older one, and garbage collection removes whole old steps
and then the blobs that no remaining manifest lists.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import logging
import os
import re
import struct
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import blake3

from jobrunner._files import Files, FsspecFiles, LocalFiles, open_files
from jobrunner.errors import (
    CheckpointCorrupted,
    CommitConflict,
    InvalidInput,
    InvalidSessionId,
    StoreError,
    StoreUnavailable,
    UnknownSession,
    UnknownStep,
)
from jobrunner.result import StepResult, Timings

__all__ = [
    "DEFAULT_GRACE",
    "DEFAULT_STORE",
    "SESSION_KEY_VARIABLE",
    "BlobParts",
    "CheckpointStore",
    "GcReport",
    "Manifest",
    "NameChange",
    "SessionKey",
    "StepDiff",
    "blob_digest",
    "new_attempt_id",
    "session_key",
    "split_blob",
    "validate_session_id",
]

logger = logging.getLogger(__name__)

DEFAULT_STORE = "./checkpoints"
# Garbage collection keeps unreferenced blobs younger than this (seconds): a
# step writes its blobs before the manifest that lists them, and a blob that
# no manifest lists yet may be about to be committed.
DEFAULT_GRACE = 3600.0
FORMAT = 1
_SESSION_ID = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?\Z")
_ATTEMPT_ID = re.compile(r"[0-9]{8}t[0-9]{9}-[0-9a-f]{8}\Z")
_DIGEST = re.compile(r"[0-9a-f]{64}\Z")


def validate_session_id(session: object) -> str:
    """Return ``session`` if it is a DNS label, else raise InvalidSessionId."""
    if not isinstance(session, str) or not _SESSION_ID.match(session):
        raise InvalidSessionId(session)
    return session


def new_attempt_id() -> str:
    """Return a new attempt id; ids sort by the time they were made."""
    now = time.time()
    stamp = time.strftime("%Y%m%dt%H%M%S", time.gmtime(now))
    return f"{stamp}{int(now % 1 * 1000):03d}-{uuid.uuid4().hex[:8]}"


def _canonical(data: dict[str, Any]) -> bytes:
    return json.dumps(data, sort_keys=True, separators=(",", ":")).encode()


# Blobs: a small header, the pickle stream, then the pickle's out-of-band
# buffers (numpy arrays, bytearrays...), each starting on a 64-byte boundary so
# that arrays rebuilt on them are aligned. Nothing is ever joined in memory: the
# parts are written one after the other and hashed where they are.
_BLOB_MAGIC = b"jobrunner-blob\x00\x01"
_BLOB_HEADER = struct.Struct("<QI")
_BLOB_LENGTH = struct.Struct("<Q")
_ALIGN = 64
# Blobs are hashed in chunks of this size, the chunks in parallel with BLAKE3
# (several times faster than SHA-256), and the digest is the hash of their
# hashes: a read is verified while it arrives, and verifying a large blob costs
# little more than reading it.
HASH_CHUNK = 8 * 2**20
_DIGEST_DOMAIN = b"jobrunner-blob-digest\x00"

Buffer = bytes | bytearray | memoryview


class BlobParts:
    """A blob as the list of buffers it is made of, never joined.

    Args:
        stream: The pickle stream.
        buffers: The pickle's out-of-band buffers, in the order it refers to them.
    """

    def __init__(self, stream: Buffer, buffers: Sequence[Buffer] = ()) -> None:
        views = [memoryview(buffer).cast("B") for buffer in buffers]
        header = _BLOB_MAGIC + _BLOB_HEADER.pack(len(stream), len(views))
        header += b"".join(_BLOB_LENGTH.pack(view.nbytes) for view in views)
        self.parts: list[Buffer] = [header]
        size = len(header)
        for part in [memoryview(stream).cast("B"), *views]:
            padding = -size % _ALIGN
            if padding:
                self.parts.append(bytes(padding))
            self.parts.append(part)
            size += padding + part.nbytes
        self.size = size

    def __len__(self) -> int:
        return self.size


def split_blob(data: Buffer) -> tuple[memoryview, list[memoryview]]:
    """Return a blob's pickle stream and out-of-band buffers, without copying.

    A blob without the header is a plain pickle stream with no buffers.

    Raises:
        ValueError: The header does not match the blob's size.
    """
    view = memoryview(data).cast("B")
    if view[: len(_BLOB_MAGIC)] != _BLOB_MAGIC:
        return view, []
    offset = len(_BLOB_MAGIC)
    stream_size, count = _BLOB_HEADER.unpack_from(view, offset)
    offset += _BLOB_HEADER.size
    sizes = [stream_size]
    for _ in range(count):
        sizes += _BLOB_LENGTH.unpack_from(view, offset)
        offset += _BLOB_LENGTH.size
    pieces = []
    for size in sizes:
        offset += -offset % _ALIGN
        if offset + size > view.nbytes:
            raise ValueError("the blob is shorter than its header says")
        pieces.append(view[offset : offset + size])
        offset += size
    if offset != view.nbytes:
        raise ValueError("the blob is longer than its header says")
    return pieces[0], pieces[1:]


def _chunks(parts: Sequence[Buffer]) -> Iterator[list[memoryview]]:
    """Cut a sequence of buffers into HASH_CHUNK-sized runs of views."""
    run: list[memoryview] = []
    room = HASH_CHUNK
    for part in parts:
        view = memoryview(part).cast("B")
        while view.nbytes:
            piece, view = view[:room], view[room:]
            run.append(piece)
            room -= piece.nbytes
            if not room:
                yield run
                run, room = [], HASH_CHUNK
    if run:
        yield run


def _hash_run(run: Sequence[memoryview]) -> bytes:
    # blake3 releases the GIL on large updates, so runs hash in parallel.
    digest = blake3.blake3()
    for view in run:
        digest.update(view)
    return digest.digest()


def _combine(size: int, chunk_digests: Sequence[bytes]) -> str:
    top = blake3.blake3(_DIGEST_DOMAIN + size.to_bytes(8, "little"))
    for chunk_digest in chunk_digests:
        top.update(chunk_digest)
    return top.hexdigest()


class _Hasher:
    """Hashes a blob's chunks as they arrive, on a small pool of threads."""

    def __init__(self) -> None:
        self.size = 0
        self._pool: Any = None
        self._digests: list[Any] = []

    def add(self, run: Sequence[memoryview]) -> None:
        self.size += sum(view.nbytes for view in run)
        if not self._digests and self.size <= HASH_CHUNK:
            self._digests.append(run)  # hashed in digest(): likely the only one
            return
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(max(2, os.cpu_count() or 2))
            self._digests = [self._pool.submit(_hash_run, r) for r in self._digests]
        self._digests.append(self._pool.submit(_hash_run, run))

    def digest(self) -> str:
        if self._pool is None:
            return _combine(self.size, [_hash_run(run) for run in self._digests])
        try:
            return _combine(self.size, [future.result() for future in self._digests])
        finally:
            self._pool.shutdown()


def blob_digest(data: Buffer | BlobParts) -> str:
    """Return the digest that names a blob: a BLAKE3 hash list of its chunks."""
    hasher = _Hasher()
    parts = data.parts if isinstance(data, BlobParts) else [data]
    for run in _chunks(parts):
        hasher.add(run)
    return hasher.digest()


# Signing keys. Each session's manifests are signed with a key derived from the
# master key, so that a step's process can be given its own session's key only:
# with it, it can sign and verify that session and no other.
SESSION_KEY_VARIABLE = "JOBRUNNER_SESSION_KEY"
_SESSION_KEY_DOMAIN = b"jobrunner-session:"


def session_key(master: bytes, session: str) -> bytes:
    """Return the key that signs one session's manifests, derived from a master."""
    message = _SESSION_KEY_DOMAIN + validate_session_id(session).encode()
    return hmac.new(master, message, hashlib.sha256).digest()


@dataclass(frozen=True)
class SessionKey:
    """A signing key valid for one session only.

    Attributes:
        session: The session the key was derived for.
        key: The derived key (see :func:`session_key`).
    """

    session: str
    key: bytes = field(repr=False)

    def to_text(self) -> str:
        """Return the form a step's environment carries: ``<session>:<hex key>``."""
        return f"{self.session}:{self.key.hex()}"

    @classmethod
    def from_text(cls, text: str) -> SessionKey:
        """Parse :meth:`to_text`'s form.

        Raises:
            StoreError: The text is not a session id and a hex key.
        """
        session, _, key = text.partition(":")
        try:
            return cls(validate_session_id(session), bytes.fromhex(key))
        except ValueError:
            raise StoreError(
                f"${SESSION_KEY_VARIABLE} is not of the form <session>:<hex key>"
            ) from None


@dataclass
class Manifest:
    """The committed state of a session after one step.

    Attributes:
        session: The session id.
        step: The step number (1 for the first step).
        variables: Name to entry: ``blob`` (digest), ``type``, ``size`` and
            ``needs`` (other names the value refers to or reads).
        blobs: Digest to ``size`` and ``pickler`` (``pickle`` or ``dill``).
        modules: Names bound to modules, recorded as imports (name to module).
        result: The committed step's result, as JSON data.
        python: The Python version that wrote the manifest.
        dill: The dill version that wrote its dill blobs, or None if it used none.
        origin: For a rollback or a fork, where the state came from:
            ``kind`` (``rollback`` or ``fork``), ``session`` and ``step``.
    """

    session: str
    step: int
    variables: dict[str, dict[str, Any]] = field(default_factory=dict)
    blobs: dict[str, dict[str, Any]] = field(default_factory=dict)
    modules: dict[str, str] = field(default_factory=dict)
    result: dict[str, Any] = field(default_factory=dict)
    python: str = ""
    dill: str | None = None
    created: str = ""
    origin: dict[str, Any] | None = None

    def to_data(self) -> dict[str, Any]:
        data = {
            "format": FORMAT,
            "session": self.session,
            "step": self.step,
            "created": self.created,
            "python": self.python,
            "dill": self.dill,
            "variables": self.variables,
            "blobs": self.blobs,
            "modules": self.modules,
            "result": self.result,
        }
        # Only rollbacks and forks carry an origin, so that every other
        # manifest keeps the shape (and the signed content) it always had.
        if self.origin is not None:
            data["origin"] = self.origin
        return data

    @classmethod
    def empty(cls, session: str) -> Manifest:
        """The state of a session before its first step."""
        return cls(session=session, step=0)


@dataclass(frozen=True)
class NameChange:
    """How one name differs between two committed steps.

    Attributes:
        name: The variable's name.
        change: ``added``, ``removed`` or ``changed``.
        before: Its type in the earlier step (``module <name>`` for a module),
            or None if it was not there.
        after: Its type in the later step, or None if it is not there.
    """

    name: str
    change: str
    before: str | None
    after: str | None


@dataclass(frozen=True)
class StepDiff:
    """The names added, removed and changed from one committed step to another.

    A name is changed when its blob or its module differs. Variables that share
    objects share a blob, so a change to one is a change to all of them.

    Attributes:
        session: The session id.
        before: The earlier step compared.
        after: The later step compared.
        changes: One entry per name that differs, sorted by name.
    """

    session: str
    before: int
    after: int
    changes: tuple[NameChange, ...]

    def names(self, change: str) -> tuple[str, ...]:
        """Return the names with one kind of change, sorted."""
        return tuple(entry.name for entry in self.changes if entry.change == change)

    @property
    def added(self) -> tuple[str, ...]:
        return self.names("added")

    @property
    def removed(self) -> tuple[str, ...]:
        return self.names("removed")

    @property
    def changed(self) -> tuple[str, ...]:
        return self.names("changed")

    def to_dict(self) -> dict[str, Any]:
        """Return the diff as JSON-ready data."""
        return {
            "session": self.session,
            "before": self.before,
            "after": self.after,
            "added": list(self.added),
            "removed": list(self.removed),
            "changed": list(self.changed),
            "changes": [dataclasses.asdict(entry) for entry in self.changes],
        }


def _identities(manifest: Manifest) -> dict[str, tuple[str, str, str]]:
    """Name to (kind, blob digest or module, type) for every name of a manifest."""
    found = {
        name: ("blob", entry["blob"], str(entry.get("type", "?")))
        for name, entry in manifest.variables.items()
    }
    for name, module in manifest.modules.items():
        found[name] = ("module", module, f"module {module}")
    return found


def diff_manifests(before: Manifest, after: Manifest) -> StepDiff:
    """Compare two manifests of one session without unpickling anything."""
    old, new = _identities(before), _identities(after)
    changes = []
    for name in sorted(old.keys() | new.keys()):
        was, now = old.get(name), new.get(name)
        if was is not None and now is not None and was[:2] == now[:2]:
            continue
        change = "added" if was is None else "removed" if now is None else "changed"
        changes.append(
            NameChange(name, change, was[2] if was else None, now[2] if now else None)
        )
    return StepDiff(before.session, before.step, after.step, tuple(changes))


@dataclass
class GcReport:
    """What a garbage collection removed, or would remove in a dry run.

    Attributes:
        dry_run: True when nothing was removed, only counted.
        steps_removed: Session to the step numbers whose manifests went.
        attempts_removed: Attempt records (and their requests) removed.
        sessions_deleted: Sessions deleted whole.
        blobs_removed: Blobs that no remaining manifest listed.
        bytes_freed: Their total size.
        blobs_kept: Blobs that a remaining manifest lists.
        blobs_in_grace: Blobs no manifest lists, kept because they are younger
            than the grace period (a running step may be about to commit them).
    """

    dry_run: bool = False
    steps_removed: dict[str, list[int]] = field(default_factory=dict)
    attempts_removed: int = 0
    sessions_deleted: list[str] = field(default_factory=list)
    blobs_removed: int = 0
    bytes_freed: int = 0
    blobs_kept: int = 0
    blobs_in_grace: int = 0

    def to_dict(self) -> dict[str, Any]:
        """Return the report as JSON-ready data."""
        return dataclasses.asdict(self)


class CheckpointStore:
    """Reads and writes sessions' checkpoints in one folder or bucket.

    Args:
        url: A local path, ``file://`` URL or any fsspec URL such as
            ``s3://bucket/prefix``. Defaults to ``$JOBRUNNER_STORE``, else
            ``./checkpoints``.
        options: Keyword options for the fsspec filesystem (for example
            ``endpoint_url``); ignored for local folders.
        signing_key: The master key that signs and verifies manifests (each
            session's with its own key derived from it). Defaults to
            ``$JOBRUNNER_SIGNING_KEY`` or the file named by
            ``$JOBRUNNER_SIGNING_KEY_FILE``; without a key, manifests are not
            signed but every blob is still checked against its digest.
        session_key: Instead of the master key, the key of one session: the
            store then signs and verifies that session only. Defaults to
            ``$JOBRUNNER_SESSION_KEY`` when there is no master key.

    Raises:
        StoreUnavailable: No filesystem is installed for the URL's protocol, or
            the signing key file cannot be read.
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        options: dict[str, Any] | None = None,
        signing_key: bytes | str | None = None,
        session_key: SessionKey | None = None,
    ) -> None:
        self.url = url or os.environ.get("JOBRUNNER_STORE") or DEFAULT_STORE
        self.options = dict(options or {})
        self.files: Files = open_files(self.url, self.options)
        key = signing_key if signing_key is not None else _key_from_environment()
        self._signing_key = key.encode() if isinstance(key, str) else key
        if not self._signing_key and session_key is None:
            session_key = _session_key_from_environment()
        self._session_key = None if self._signing_key else session_key

    def __repr__(self) -> str:
        return f"CheckpointStore({self.url!r})"

    @property
    def signed(self) -> bool:
        """True when manifests are signed and verified with a key."""
        return bool(self._signing_key) or self._session_key is not None

    def key_for_session(self, session: str) -> SessionKey | None:
        """Return the key that signs one session's manifests, or None if unsigned.

        This is what a step's process is given instead of the master key.

        Raises:
            StoreError: The store holds the key of another session only.
        """
        if self._signing_key:
            return SessionKey(session, session_key(self._signing_key, session))
        if self._session_key is None:
            return None
        if self._session_key.session != session:
            raise StoreError(
                f"this process holds the signing key of session"
                f" {self._session_key.session!r} only, not of {session!r}"
            )
        return self._session_key

    def schedule_url(self, schedule: str, path: str) -> str:
        """Return the local path or URL of a file of a notebook schedule.

        A schedule keeps its notebook, its parameters and the notebook of every
        run under ``schedules/<schedule>/``; ``schedule`` must be a validated
        DNS label, ``path`` is relative to that folder.
        """
        return f"{self.files.url.rstrip('/')}/schedules/{schedule}/{path}"

    # Sessions and steps.

    def sessions(self) -> list[str]:
        """Return the ids of every session in the store."""
        return [name for name in self.files.list("sessions") if _SESSION_ID.match(name)]

    def exists(self, session: str) -> bool:
        """Return True if the session has any committed or attempted step."""
        validate_session_id(session)
        prefix = f"sessions/{session}"
        # Every commit writes the HEAD hint: one lookup answers for a session
        # with steps, where listing its steps would cost one name per step.
        if self.files.exists(f"{prefix}/HEAD"):
            return True
        return bool(
            self.files.list(f"{prefix}/steps") or self.files.list(f"{prefix}/attempts")
        )

    def require(self, session: str) -> None:
        """Raise UnknownSession unless the session exists in the store."""
        if not self.exists(session):
            raise UnknownSession(session, self.url)

    def head(self, session: str) -> int:
        """Return the last committed step of a session (0 before the first)."""
        validate_session_id(session)
        step = self._head_hint(session)
        while self.files.exists(self._manifest_path(session, step + 1)):
            step += 1
        return step

    def _head_hint(self, session: str) -> int:
        try:
            hint = int(self.files.read(f"sessions/{session}/HEAD"))
        except (FileNotFoundError, ValueError):
            return self._scan_head(session)
        if hint and not self.files.exists(self._manifest_path(session, hint)):
            return self._scan_head(session)
        return hint

    def _scan_head(self, session: str) -> int:
        steps = [name for name in self.files.list(f"sessions/{session}/steps")]
        numbers = [int(name[:-5]) for name in steps if name.endswith(".json")]
        return max(numbers, default=0)

    @staticmethod
    def _manifest_path(session: str, step: int) -> str:
        return f"sessions/{session}/steps/{step:010d}.json"

    def manifest(self, session: str, step: int | None = None) -> Manifest:
        """Return a verified manifest: the given step, or the last one.

        Raises:
            UnknownStep: The session has not committed that step.
            CheckpointCorrupted: The manifest failed verification.
        """
        validate_session_id(session)
        last = self.head(session)
        step = last if step is None else step
        if step == 0:
            return Manifest.empty(session)
        if not 0 < step <= last:
            raise UnknownStep(session, step, last)
        return self._read_manifest(session, step)

    def _read_manifest(self, session: str, step: int) -> Manifest:
        path = self._manifest_path(session, step)
        try:
            data = json.loads(self.files.read(path))
        except FileNotFoundError:
            raise UnknownStep(session, step, self.head(session)) from None
        except ValueError as error:
            raise CheckpointCorrupted(
                f"the manifest of step {step} of session {session!r} is not valid"
                f" JSON ({path})",
                session=session,
                name=path,
            ) from error
        self._verify_manifest(data, session, step, path)
        logger.debug("verified the manifest of step %d of session %s", step, session)
        return Manifest(
            session=session,
            step=step,
            variables=data.get("variables", {}),
            blobs=data.get("blobs", {}),
            modules=data.get("modules", {}),
            result=data.get("result", {}),
            python=data.get("python", ""),
            dill=data.get("dill"),
            created=data.get("created", ""),
            origin=data.get("origin"),
        )

    def _verify_manifest(
        self, data: dict[str, Any], session: str, step: int, path: str
    ) -> None:
        def refuse(why: str) -> CheckpointCorrupted:
            return CheckpointCorrupted(
                f"refused the manifest of step {step} of session {session!r} ({path}):"
                f" {why}",
                session=session,
                name=path,
            )

        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise refuse("it is not a jobrunner manifest of a known format")
        if data.get("session") != session or data.get("step") != step:
            raise refuse(
                f"it was written for session {data.get('session')!r} step"
                f" {data.get('step')!r}"
            )
        signature = data.pop("signature", None)
        if self.signed:
            try:
                expected = self._sign(session, data)
            except StoreError as error:
                raise refuse(str(error)) from None
            if not isinstance(signature, str):
                raise refuse("it is not signed and a signing key is configured")
            if not hmac.compare_digest(signature, expected):
                raise refuse("its signature does not match its content")
        problem = _shape_problem(data)
        if problem:
            raise refuse(problem)

    def _sign(self, session: str, data: dict[str, Any]) -> str:
        key = self.key_for_session(session)
        assert key is not None
        return hmac.new(key.key, _canonical(data), hashlib.sha256).hexdigest()

    def commit(self, manifest: Manifest) -> None:
        """Create the manifest of a new step, only if no other step did first.

        Every blob it lists must already be written.

        Raises:
            CommitConflict: The step number was committed by another step.
        """
        manifest.python = manifest.python or sys.version.split()[0]
        manifest.created = manifest.created or _now()
        data = manifest.to_data()
        if self.signed:
            data["signature"] = self._sign(manifest.session, data)
        path = self._manifest_path(manifest.session, manifest.step)
        try:
            self.files.create(path, json.dumps(data).encode())
        except FileExistsError:
            raise CommitConflict(manifest.session, manifest.step) from None
        # A hint, found again from the manifests if a crash loses it.
        head = f"sessions/{manifest.session}/HEAD"
        self.files.write(head, b"%d" % manifest.step, durable=False)
        logger.debug("committed step %d of session %s", manifest.step, manifest.session)

    # Blobs.

    @staticmethod
    def _blob_path(digest: str) -> str:
        return f"blobs/{digest[:2]}/{digest}"

    def write_blob(self, data: Buffer | BlobParts, digest: str | None = None) -> int:
        """Store a blob unless the store holds it already; return bytes written.

        Args:
            data: The blob's bytes, or its parts (written one after the other,
                never joined in memory).
            digest: The blob's :func:`blob_digest`, when the caller has it.
        """
        digest = digest or blob_digest(data)
        path = self._blob_path(digest)
        # A blob that is already there may be one that no manifest lists any
        # more: renewing its time keeps garbage collection, which spares young
        # blobs, from removing it before this step commits it.
        if self.files.refresh(path) and self._holds_blob(digest):
            return 0
        parts = data.parts if isinstance(data, BlobParts) else [data]
        self.files.write_parts(path, parts)
        return len(data)

    def _holds_blob(self, digest: str) -> bool:
        # A blob found under its digest is trusted only once it matches: a
        # writer that can guess a step's next blob could otherwise put other
        # bytes there first, and the step would commit a state nobody can load.
        try:
            self.read_blob(digest)
        except CheckpointCorrupted:
            logger.warning("the blob %s did not match its digest; writing it", digest)
            return False
        return True

    def read_blob(
        self, digest: str, *, session: str = "", name: str = ""
    ) -> memoryview:
        """Return a blob's bytes after checking them against their digest.

        The bytes are a private, writable buffer: arrays rebuilt on it are
        writable, and nobody can change it between its check and its use.

        Raises:
            CheckpointCorrupted: The blob is missing or its bytes do not match.
        """
        what = f"the blob {digest} holding {name!r}" if name else f"the blob {digest}"
        where = f" of session {session!r}" if session else ""
        if not _DIGEST.match(digest):
            raise CheckpointCorrupted(
                f"{what}{where} has an invalid digest", session=session, name=name
            )
        hasher = _Hasher()
        try:
            data = self.files.read_into(
                self._blob_path(digest), HASH_CHUNK, lambda view: hasher.add([view])
            )
        except FileNotFoundError:
            hasher.digest()
            raise CheckpointCorrupted(
                f"{what}{where} is missing from the store {self.url}",
                session=session,
                name=name,
            ) from None
        if hasher.digest() != digest:
            raise CheckpointCorrupted(
                f"{what}{where} does not match its digest: it was corrupted or"
                " tampered with, and was not loaded",
                session=session,
                name=name,
            )
        return data

    # Requests and attempts.

    def write_request(
        self, session: str, attempt: str, request: dict[str, Any]
    ) -> None:
        """Record what an attempt is asked to run, before it starts.

        With a signing key the request is signed, with its session and
        attempt, so that a step's process runs only code that its own session's
        caller asked for: a request written by anyone else is refused.
        """
        path = f"sessions/{session}/requests/{attempt}.json"
        data = dict(request)
        if self.signed:
            data["signature"] = self._sign_request(session, attempt, request)
        # Read at once by the step it starts: no need to wait for the disk.
        self.files.write(path, json.dumps(data).encode(), durable=False)

    def read_request(self, session: str, attempt: str) -> dict[str, Any]:
        """Return an attempt's request, verified when a signing key is configured.

        Raises:
            UnknownSession: The attempt has no request.
            CheckpointCorrupted: The request's signature is missing or wrong.
        """
        path = f"sessions/{validate_session_id(session)}/requests/{attempt}.json"
        try:
            request: dict[str, Any] = json.loads(self.files.read(path))
        except FileNotFoundError:
            raise UnknownSession(session, self.url) from None
        signature = request.pop("signature", None)
        if self.signed and not (
            isinstance(signature, str)
            and hmac.compare_digest(
                signature, self._sign_request(session, attempt, request)
            )
        ):
            raise CheckpointCorrupted(
                f"refused the request of attempt {attempt} of session {session!r}"
                f" ({path}): it is not signed with the session's key, so it was"
                " not written by the session's caller",
                session=session,
                name=path,
            )
        return request

    def _sign_request(self, session: str, attempt: str, request: dict[str, Any]) -> str:
        # Other keys than a manifest's: a signed request never verifies as one.
        return self._sign(
            session, {"request": request, "session": session, "attempt": attempt}
        )

    def record(self, result: StepResult) -> None:
        """Store the result of an attempt (committed or not)."""
        path = f"sessions/{result.session}/attempts/{result.attempt}.json"
        # A committed step's result is also in its manifest, which is durable.
        self.files.write(path, json.dumps(result.to_dict()).encode(), durable=False)

    def attempt(self, session: str, attempt: str) -> StepResult | None:
        """Return the recorded result of an attempt, or None if it has none."""
        path = f"sessions/{validate_session_id(session)}/attempts/{attempt}.json"
        try:
            return StepResult.from_dict(json.loads(self.files.read(path)))
        except FileNotFoundError:
            return None

    def committed_by(
        self, session: str, attempt: str, since: float
    ) -> StepResult | None:
        """Return the result of ``attempt`` if it committed a step.

        This finds the outcome of a step whose process died between its commit
        and the recording of its result. Only manifests created after ``since``
        (a POSIX time) are read.
        """
        for step in range(self.head(session), 0, -1):
            try:
                manifest = self._read_manifest(session, step)
            except UnknownStep:  # removed by garbage collection: older still
                break
            if manifest.result.get("attempt") == attempt:
                return StepResult.from_dict(manifest.result)
            if _posix_time(manifest.created) < since - 1:
                break
        return None

    def history(self, session: str, last: int | None = None) -> list[StepResult]:
        """Return the results of a session's attempts, oldest first.

        Args:
            session: The session id.
            last: Return only this many of the most recent attempts.

        Raises:
            UnknownSession: The store holds no such session.
        """
        self.require(session)
        names = self.files.list(f"sessions/{session}/attempts")
        wanted = len(names) if last is None else max(last, 0)
        # From the newest back, so that a long session's older names are not
        # each matched for the last few.
        chosen: list[str] = []
        for name in reversed(names):
            if len(chosen) == wanted:
                break
            if _ATTEMPT_ID.match(name[:-5]):
                chosen.append(name)
        names = chosen[::-1]
        results = []
        for name in names:
            result = self.attempt(session, name[:-5])
            if result is not None:
                results.append(result)
        return results

    # Comparing, rolling back and forking: new manifests from older ones.

    def diff(self, session: str, before: int, after: int) -> StepDiff:
        """Return the names added, removed and changed from one step to another.

        Only the two manifests are read (and verified); nothing is unpickled.

        Raises:
            UnknownSession: The store holds no such session.
            UnknownStep: The session has not committed one of the steps.
        """
        self.require(session)
        return diff_manifests(
            self.manifest(session, before), self.manifest(session, after)
        )

    def rollback(self, session: str, step: int) -> StepResult:
        """Commit, as a new step, the state of an earlier step.

        History is not rewritten: the new step's manifest lists the variables,
        modules and blobs of ``step``, and its result says it is a rollback.
        It is committed like any step, so a step that commits first makes it
        fail with CommitConflict.

        Args:
            session: The session id.
            step: The committed step whose state to restore (0: empty).

        Returns:
            The new step's result.

        Raises:
            UnknownSession: The store holds no such session.
            UnknownStep: The session has not committed that step.
            CommitConflict: Another step committed the next step first.
        """
        self.require(session)
        clock = time.perf_counter()
        head = self.head(session)
        target = self.manifest(session, step)
        current = self.manifest(session, head)
        change = diff_manifests(current, target)
        origin = {"kind": "rollback", "session": session, "step": target.step}
        result = self._copied(
            session,
            head + 1,
            f"# rollback to step {target.step}",
            change,
            elapsed=time.perf_counter() - clock,
        )
        self._commit_copy(target, session, head + 1, origin, result)
        logger.info("rolled session %s back to step %d", session, target.step)
        return result

    def fork(self, source: str, new: str, step: int | None = None) -> StepResult:
        """Start a new session whose first step holds the state of another's step.

        Nothing but one manifest is written: blobs are content-addressed, so
        the two sessions share them.

        Args:
            source: The session to fork.
            new: The new session's id; it must not exist yet.
            step: The source's committed step (default: its last).

        Returns:
            The result of the new session's step 1.

        Raises:
            InvalidSessionId: An id is not a DNS label.
            UnknownSession: The store holds no session ``source``.
            UnknownStep: The source has not committed that step.
            InvalidInput: The session ``new`` exists already.
            CommitConflict: Another fork created ``new`` first.
            StoreError: The store holds the signing key of one session only.
        """
        validate_session_id(new)
        self.require(source)
        if self.exists(new):
            raise InvalidInput(
                f"session {new!r} already exists in the store {self.url};"
                " fork into a new id"
            )
        clock = time.perf_counter()
        target = self.manifest(source, step)
        if target.step == 0:
            raise UnknownStep(source, 0, 0)
        change = diff_manifests(Manifest.empty(new), target)
        origin = {"kind": "fork", "session": source, "step": target.step}
        result = self._copied(
            new,
            1,
            f"# fork of session {source} at step {target.step}",
            change,
            elapsed=time.perf_counter() - clock,
        )
        self._commit_copy(target, new, 1, origin, result)
        logger.info("forked session %s at step %d into %s", source, target.step, new)
        return result

    @staticmethod
    def _copied(
        session: str, step: int, code: str, change: StepDiff, elapsed: float
    ) -> StepResult:
        """The result of a step that copies another's state: nothing ran."""
        return StepResult(
            session=session,
            attempt=new_attempt_id(),
            status="ok",
            code=code,
            base_step=step - 1,
            step=step,
            created=change.added,
            changed=change.changed,
            deleted=change.removed,
            timings=Timings(save=elapsed),
            started=_now(),
        )

    def _commit_copy(
        self,
        target: Manifest,
        session: str,
        step: int,
        origin: dict[str, Any],
        result: StepResult,
    ) -> None:
        manifest = Manifest(
            session=session,
            step=step,
            variables=target.variables,
            blobs=target.blobs,
            modules=target.modules,
            result=result.to_dict(),
            python=target.python,
            dill=target.dill,
            origin=origin,
        )
        self.commit(manifest)
        self.record(result)

    # Garbage collection.

    def gc(
        self,
        *,
        keep_last: int | None = None,
        older_than: float | None = None,
        grace: float = DEFAULT_GRACE,
        dry_run: bool = False,
    ) -> GcReport:
        """Remove old steps, then every blob that no remaining manifest lists.

        A step is removed when it is not its session's last, not among the
        last ``keep_last`` (when given) and older than ``older_than`` seconds
        (when given); with neither, no step is removed and only unreferenced
        blobs go. The attempt records (and requests) of removed steps go with
        them. A blob is removed only if no manifest of any session lists it and
        it is older than ``grace`` seconds, by the store's modification time:
        a running step writes its blobs before the manifest that lists them.

        Args:
            keep_last: Keep at least this many of each session's last steps.
            older_than: Remove only steps committed more than this many
                seconds ago.
            grace: Keep unreferenced blobs younger than this many seconds.
            dry_run: Count what would be removed; remove nothing.

        Returns:
            What was removed (or would be, in a dry run).

        Raises:
            InvalidInput: An argument is out of range.
            CheckpointCorrupted: A manifest cannot be read, so which blobs it
                lists is unknown; no blob was removed.
        """
        _check_gc_options(keep_last, older_than, grace)
        report = GcReport(dry_run=dry_run)
        if keep_last is not None or older_than is not None:
            for session in self.sessions():
                self._prune(session, keep_last, older_than, report)
        self._sweep(grace, report)
        logger.info(
            "garbage collection%s: %d steps, %d blobs, %d bytes",
            " (dry run)" if dry_run else "",
            sum(len(steps) for steps in report.steps_removed.values()),
            report.blobs_removed,
            report.bytes_freed,
        )
        return report

    def delete(
        self, session: str, *, grace: float = DEFAULT_GRACE, dry_run: bool = False
    ) -> GcReport:
        """Delete a session's folder, then the blobs no other session lists.

        Blobs younger than ``grace`` seconds stay until a later collection,
        as in :meth:`gc`.

        Raises:
            UnknownSession: The store holds no such session.
        """
        _check_gc_options(None, None, grace)
        self.require(session)
        report = GcReport(dry_run=dry_run, sessions_deleted=[session])
        report.steps_removed[session] = self._step_numbers(session)
        report.attempts_removed = len(self._attempt_names(session))
        if not dry_run:
            self._remove_session_folder(session)
        self._sweep(grace, report)
        logger.info("deleted session %s", session)
        return report

    def _step_numbers(self, session: str) -> list[int]:
        names = self.files.list(f"sessions/{session}/steps")
        return sorted(int(name[:-5]) for name in names if name[:-5].isdigit())

    def _attempt_names(self, session: str) -> list[str]:
        names = self.files.list(f"sessions/{session}/attempts")
        return [name[:-5] for name in names if _ATTEMPT_ID.match(name[:-5])]

    def _prune(
        self,
        session: str,
        keep_last: int | None,
        older_than: float | None,
        report: GcReport,
    ) -> None:
        """Remove one session's old steps and the attempts that led to them."""
        steps = self._step_numbers(session)
        kept = set(steps[-(keep_last or 1) :])
        cutoff = None if older_than is None else time.time() - older_than
        removed = [
            step
            for step in steps
            if step not in kept
            and (cutoff is None or self._created(session, step) < cutoff)
        ]
        if not removed:
            return
        report.steps_removed[session] = removed
        first_kept = min(set(steps) - set(removed))
        for attempt in self._attempt_names(session):
            result = self.attempt(session, attempt)
            # An attempt goes with the step it committed or, if it committed
            # nothing, with the step it ran on.
            if result is None:
                continue
            step = result.step if result.step is not None else result.base_step
            if step in removed or step < first_kept:
                report.attempts_removed += 1
                if not report.dry_run:
                    self.files.remove(f"sessions/{session}/attempts/{attempt}.json")
                    self.files.remove(f"sessions/{session}/requests/{attempt}.json")
        if not report.dry_run:
            for step in removed:
                self.files.remove(self._manifest_path(session, step))

    def _created(self, session: str, step: int) -> float:
        """When a step was committed, as a POSIX time (its manifest's record)."""
        path = self._manifest_path(session, step)
        try:
            stamp = json.loads(self.files.read(path)).get("created", "")
        except (ValueError, AttributeError):
            stamp = ""
        return _posix_time(stamp) if stamp else self.files.modified(path)

    def _referenced_blobs(
        self, skip: dict[str, list[int]], heads: dict[str, int], since: bool = False
    ) -> set[str]:
        """Every digest a manifest of any session lists, but the skipped steps'.

        ``heads`` gets each session's last step seen; with ``since``, only the
        manifests committed after those are read.
        """
        found: set[str] = set()
        for session in self.sessions():
            steps = self._step_numbers(session)
            if since:
                steps = [step for step in steps if step > heads.get(session, 0)]
            for step in steps:
                if step not in skip.get(session, ()):
                    found |= self._listed_blobs(session, step)
            if steps:
                heads[session] = max(steps[-1], heads.get(session, 0))
        return found

    def _listed_blobs(self, session: str, step: int) -> set[str]:
        # Read without verification: nothing is unpickled, and a manifest that
        # fails verification must still protect the blobs it lists.
        path = self._manifest_path(session, step)
        try:
            data = json.loads(self.files.read(path))
            listed = set(data.get("blobs", {}))
            listed |= {entry["blob"] for entry in data.get("variables", {}).values()}
        except FileNotFoundError:
            return set()  # removed meanwhile, by another collection
        except (ValueError, AttributeError, KeyError, TypeError) as error:
            raise CheckpointCorrupted(
                f"garbage collection stopped before removing any blob: the"
                f" manifest {path} cannot be read, so the blobs it lists are"
                " unknown; repair or remove it",
                session=session,
                name=path,
            ) from error
        return {digest for digest in listed if isinstance(digest, str)}

    def _sweep(self, grace: float, report: GcReport) -> None:
        """Remove the blobs no manifest lists that are older than ``grace``."""
        skip = report.steps_removed if report.dry_run else {}
        heads: dict[str, int] = {}
        referenced = self._referenced_blobs(skip, heads)
        cutoff = time.time() - grace
        candidates: dict[str, int] = {}
        for digest in self._blob_digests():
            if digest in referenced:
                report.blobs_kept += 1
                continue
            try:
                modified, size = self._blob_stat(digest)
            except FileNotFoundError:  # removed meanwhile, by another collection
                continue
            if modified > cutoff:
                report.blobs_in_grace += 1
            else:
                candidates[digest] = size
        # A second look at the manifests committed since the first: a step that
        # reused an old blob may have committed it in between.
        again = self._referenced_blobs(skip, heads, since=True) & candidates.keys()
        report.blobs_kept += len(again)
        for digest, size in candidates.items():
            if digest in again or self._reused_since(digest, cutoff):
                continue
            if not report.dry_run:
                self.files.remove(self._blob_path(digest))
            report.blobs_removed += 1
            report.bytes_freed += size

    def _reused_since(self, digest: str, cutoff: float) -> bool:
        """True if a step wrote or reused the blob since the sweep began.

        What remains is the instant between this look and the removal.
        """
        try:
            return self._blob_stat(digest)[0] > cutoff
        except FileNotFoundError:
            return True

    def _blob_digests(self) -> Iterator[str]:
        for prefix in self.files.list("blobs"):
            for name in self.files.list(f"blobs/{prefix}"):
                if _DIGEST.match(name) and name.startswith(prefix):
                    yield name

    def _blob_stat(self, digest: str) -> tuple[float, int]:
        """A blob's modification time (POSIX) and size in bytes."""
        path = self._blob_path(digest)
        files = self.files
        if isinstance(files, LocalFiles):
            status = os.stat(os.path.join(files.root, path))
            return status.st_mtime, status.st_size
        size = 0
        if isinstance(files, FsspecFiles):
            size = int(files.fs.size(f"{files.root}/{path}") or 0)
        return files.modified(path), size

    def _remove_session_folder(self, session: str) -> None:
        folder = f"sessions/{session}"
        files = self.files
        if isinstance(files, LocalFiles):
            import shutil  # only deleting a session needs it

            shutil.rmtree(os.path.join(files.root, folder), ignore_errors=True)
        elif isinstance(files, FsspecFiles):
            full = f"{files.root}/{folder}"
            if files.fs.exists(full):
                files.fs.rm(full, recursive=True)
        else:
            for part in ("steps", "attempts", "requests"):
                for name in files.list(f"{folder}/{part}"):
                    files.remove(f"{folder}/{part}/{name}")
            files.remove(f"{folder}/HEAD")


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _posix_time(stamp: str) -> float:
    import calendar  # rare path: only when a step's process died unrecorded

    try:
        return float(calendar.timegm(time.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ")))
    except ValueError:
        return 0.0


def _check_gc_options(
    keep_last: int | None, older_than: float | None, grace: float
) -> None:
    if keep_last is not None and (not isinstance(keep_last, int) or keep_last < 1):
        raise InvalidInput(
            f"keep_last must be a whole number >= 1 (the last step always stays),"
            f" not {keep_last!r}"
        )
    if older_than is not None and not older_than >= 0:
        raise InvalidInput(f"older_than must be >= 0 seconds, not {older_than!r}")
    if not grace >= 0:
        raise InvalidInput(f"the grace period must be >= 0 seconds, not {grace!r}")


def _shape_problem(data: dict[str, Any]) -> str | None:
    """Say what is wrong with a manifest's structure, or return None."""
    for part in ("variables", "blobs", "modules", "result"):
        if not isinstance(data.get(part, {}), dict):
            return f"its {part} are not a mapping"
    if not isinstance(data.get("origin", {}), dict):
        return "its origin is not a mapping"
    for digest in data.get("blobs", {}):
        if not _DIGEST.match(digest):
            return f"it lists an invalid blob digest {digest!r}"
    for name, entry in data.get("variables", {}).items():
        if not isinstance(entry, dict) or entry.get("blob") not in data["blobs"]:
            return f"the variable {name!r} names a blob it does not list"
    return None


def _session_key_from_environment() -> SessionKey | None:
    text = os.environ.get(SESSION_KEY_VARIABLE)
    return SessionKey.from_text(text) if text else None


def _key_from_environment() -> bytes | None:
    key = os.environ.get("JOBRUNNER_SIGNING_KEY")
    if key:
        return key.encode()
    key_file = os.environ.get("JOBRUNNER_SIGNING_KEY_FILE")
    if not key_file:
        return None
    try:
        with open(key_file, "rb") as file:
            return file.read().strip()
    except OSError as error:
        raise StoreUnavailable(
            f"cannot read the signing key file {key_file}: {error.strerror}"
        ) from error
