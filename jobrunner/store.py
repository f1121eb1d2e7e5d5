"""The checkpoint store: the one owner of jobrunner's on-disk format.

Layout under the store's root (a local folder or any fsspec URL)::

    blobs/<2 hex>/<sha256>                  pickled variables, content-addressed
    sessions/<id>/steps/<step>.json         manifests: one per committed step
    sessions/<id>/attempts/<attempt>.json   the result of every attempt
    sessions/<id>/requests/<attempt>.json   the code an attempt was asked to run
    sessions/<id>/HEAD                      a hint: the last committed step

A manifest maps each variable to the digest of the blob that holds it. Step
``n + 1`` is committed by creating its manifest only if it does not exist, so of
two steps racing on one session exactly one commits. Blobs are immutable and never
read before their digest matches the manifest, and manifests are verified
(session, step and, with a signing key, an HMAC over their whole content) before
anything they list is unpickled.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import re
import sys
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from jobrunner._files import Files, open_files
from jobrunner.errors import (
    CheckpointCorrupted,
    CommitConflict,
    InvalidSessionId,
    StoreUnavailable,
    UnknownSession,
    UnknownStep,
)
from jobrunner.result import StepResult

__all__ = [
    "DEFAULT_STORE",
    "CheckpointStore",
    "Manifest",
    "new_attempt_id",
    "validate_session_id",
]

logger = logging.getLogger(__name__)

DEFAULT_STORE = "./checkpoints"
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

    def to_data(self) -> dict[str, Any]:
        return {
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

    @classmethod
    def empty(cls, session: str) -> Manifest:
        """The state of a session before its first step."""
        return cls(session=session, step=0)


class CheckpointStore:
    """Reads and writes sessions' checkpoints in one folder or bucket.

    Args:
        url: A local path, ``file://`` URL or any fsspec URL such as
            ``s3://bucket/prefix``. Defaults to ``$JOBRUNNER_STORE``, else
            ``./checkpoints``.
        options: Keyword options for the fsspec filesystem (for example
            ``endpoint_url``); ignored for local folders.
        signing_key: The key that signs and verifies manifests. Defaults to
            ``$JOBRUNNER_SIGNING_KEY`` or the file named by
            ``$JOBRUNNER_SIGNING_KEY_FILE``; without one, manifests are not
            signed but every blob is still checked against its digest.

    Raises:
        StoreUnavailable: No filesystem is installed for the URL's protocol.
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        options: dict[str, Any] | None = None,
        signing_key: bytes | str | None = None,
    ) -> None:
        self.url = url or os.environ.get("JOBRUNNER_STORE") or DEFAULT_STORE
        self.options = dict(options or {})
        self.files: Files = open_files(self.url, self.options)
        key = signing_key if signing_key is not None else _key_from_environment()
        self._signing_key = key.encode() if isinstance(key, str) else key

    def __repr__(self) -> str:
        return f"CheckpointStore({self.url!r})"

    @property
    def signed(self) -> bool:
        """True when manifests are signed and verified with a key."""
        return bool(self._signing_key)

    # Sessions and steps.

    def sessions(self) -> list[str]:
        """Return the ids of every session in the store."""
        return [name for name in self.files.list("sessions") if _SESSION_ID.match(name)]

    def exists(self, session: str) -> bool:
        """Return True if the session has any committed or attempted step."""
        validate_session_id(session)
        prefix = f"sessions/{session}"
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
        return Manifest(
            session=session,
            step=step,
            variables=data["variables"],
            blobs=data["blobs"],
            modules=data["modules"],
            result=data.get("result", {}),
            python=data.get("python", ""),
            dill=data.get("dill"),
            created=data.get("created", ""),
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
        if self._signing_key:
            if not isinstance(signature, str):
                raise refuse("it is not signed and a signing key is configured")
            if not hmac.compare_digest(signature, self._sign(session, data)):
                raise refuse("its signature does not match its content")
        for digest in data.get("blobs", {}):
            if not _DIGEST.match(digest):
                raise refuse(f"it lists an invalid blob digest {digest!r}")

    def _sign(self, session: str, data: dict[str, Any]) -> str:
        assert self._signing_key
        return hmac.new(self._signing_key, _canonical(data), hashlib.sha256).hexdigest()

    def commit(self, manifest: Manifest) -> None:
        """Create the manifest of a new step, only if no other step did first.

        Every blob it lists must already be written.

        Raises:
            CommitConflict: The step number was committed by another step.
        """
        manifest.python = manifest.python or sys.version.split()[0]
        manifest.created = manifest.created or _now()
        data = manifest.to_data()
        if self._signing_key:
            data["signature"] = self._sign(manifest.session, data)
        path = self._manifest_path(manifest.session, manifest.step)
        try:
            self.files.create(path, json.dumps(data).encode())
        except FileExistsError:
            raise CommitConflict(manifest.session, manifest.step) from None
        self.files.write(f"sessions/{manifest.session}/HEAD", b"%d" % manifest.step)
        logger.debug("committed step %d of session %s", manifest.step, manifest.session)

    # Blobs.

    @staticmethod
    def _blob_path(digest: str) -> str:
        return f"blobs/{digest[:2]}/{digest}"

    def write_blob(self, data: bytes, digest: str | None = None) -> int:
        """Store a blob unless the store holds it already; return bytes written."""
        digest = digest or hashlib.sha256(data).hexdigest()
        path = self._blob_path(digest)
        if self.files.exists(path):
            return 0
        self.files.write(path, data)
        return len(data)

    def read_blob(self, digest: str, *, session: str = "", name: str = "") -> bytes:
        """Return a blob's bytes after checking them against their digest.

        Raises:
            CheckpointCorrupted: The blob is missing or its bytes do not match.
        """
        what = f"the blob {digest} holding {name!r}" if name else f"the blob {digest}"
        where = f" of session {session!r}" if session else ""
        try:
            data = self.files.read(self._blob_path(digest))
        except FileNotFoundError:
            raise CheckpointCorrupted(
                f"{what}{where} is missing from the store {self.url}",
                session=session,
                name=name,
            ) from None
        if hashlib.sha256(data).hexdigest() != digest:
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
        """Record what an attempt is asked to run, before it starts."""
        path = f"sessions/{session}/requests/{attempt}.json"
        self.files.write(path, json.dumps(request).encode())

    def read_request(self, session: str, attempt: str) -> dict[str, Any]:
        """Return an attempt's request; raise UnknownSession if there is none."""
        path = f"sessions/{validate_session_id(session)}/requests/{attempt}.json"
        try:
            request: dict[str, Any] = json.loads(self.files.read(path))
        except FileNotFoundError:
            raise UnknownSession(session, self.url) from None
        return request

    def record(self, result: StepResult) -> None:
        """Store the result of an attempt (committed or not)."""
        path = f"sessions/{result.session}/attempts/{result.attempt}.json"
        self.files.write(path, json.dumps(result.to_dict()).encode())

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
            manifest = self._read_manifest(session, step)
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
        names = [name for name in names if _ATTEMPT_ID.match(name[:-5])]
        if last is not None:
            names = names[-last:] if last > 0 else []
        results = []
        for name in names:
            result = self.attempt(session, name[:-5])
            if result is not None:
                results.append(result)
        return results


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _posix_time(stamp: str) -> float:
    import calendar  # rare path: only when a step's process died unrecorded

    try:
        return float(calendar.timegm(time.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ")))
    except ValueError:
        return 0.0


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
