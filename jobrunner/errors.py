"""The exceptions jobrunner raises.

User code that raises is not an exception of jobrunner: it is a step result with
status ``error``. What is raised here is a failure of jobrunner, its store or its
backend, or bad input given to it::

    JobRunnerError
    ├── InvalidInput
    │   ├── InvalidSessionId
    │   └── UnknownSession / UnknownStep
    ├── StoreError
    │   ├── StoreUnavailable
    │   ├── CheckpointCorrupted
    │   └── CommitConflict
    └── BackendError
        ├── StepCrashed
        ├── StepKilled
        ├── ImagePullFailed
        ├── Unschedulable
        ├── PodEvicted
        └── ClusterUnavailable

Every class keeps its context (session, step, job name...) as attributes, and its
message is one sentence that names the thing and, when it is known, the fix.
"""

from __future__ import annotations

__all__ = [
    "BackendError",
    "CheckpointCorrupted",
    "ClusterUnavailable",
    "CommitConflict",
    "ImagePullFailed",
    "InvalidInput",
    "InvalidSessionId",
    "JobRunnerError",
    "PodEvicted",
    "StepCrashed",
    "StepKilled",
    "StoreError",
    "StoreUnavailable",
    "UnknownSession",
    "UnknownStep",
    "Unschedulable",
]


class JobRunnerError(Exception):
    """Base class of every error jobrunner raises."""


class InvalidInput(JobRunnerError, ValueError):
    """Input that jobrunner refuses before doing any work."""


class InvalidSessionId(InvalidInput):
    """A session id that is not a DNS label."""

    def __init__(self, session: object) -> None:
        self.session = session
        super().__init__(
            f"invalid session id {session!r}: use 1 to 63 lowercase letters, digits"
            " and '-', starting and ending with a letter or digit"
        )


class UnknownSession(InvalidInput, LookupError):
    """A session that has no committed or attempted step in the store."""

    def __init__(self, session: str, store: str) -> None:
        self.session = session
        self.store = store
        super().__init__(f"no session {session!r} in the store {store}")


class UnknownStep(InvalidInput, LookupError):
    """A step number that the session has not committed."""

    def __init__(self, session: str, step: int, last: int) -> None:
        self.session = session
        self.step = step
        self.last = last
        super().__init__(
            f"session {session!r} has no step {step}: its steps are 1 to {last}"
            if last
            else f"session {session!r} has no committed step yet"
        )


class StoreError(JobRunnerError):
    """The checkpoint store failed or holds something unusable."""


class StoreUnavailable(StoreError):
    """The store could not be reached, or has no filesystem installed for it."""


class CheckpointCorrupted(StoreError):
    """A manifest or blob failed verification and was not unpickled."""

    def __init__(self, message: str, *, session: str = "", name: str = "") -> None:
        self.session = session
        self.name = name
        super().__init__(message)


class CommitConflict(StoreError):
    """Another step committed the same step number first."""

    def __init__(self, session: str, step: int) -> None:
        self.session = session
        self.step = step
        super().__init__(
            f"step {step} of session {session!r} was committed by another step"
            " first; this step changed nothing (run it again to apply it on top)"
        )


class BackendError(JobRunnerError):
    """The backend could not run the step runtime to its end."""

    def __init__(self, message: str, *, session: str = "", job: str = "") -> None:
        self.session = session
        self.job = job
        super().__init__(message)


class StepCrashed(BackendError):
    """The step runtime exited without recording a result."""

    def __init__(
        self, message: str, *, session: str = "", job: str = "", exit_code: int
    ) -> None:
        self.exit_code = exit_code
        super().__init__(message, session=session, job=job)


class StepKilled(BackendError):
    """The step's process was killed (out of memory, evicted, cancelled)."""

    def __init__(
        self, message: str, *, session: str = "", job: str = "", reason: str = ""
    ) -> None:
        self.reason = reason
        super().__init__(message, session=session, job=job)


class ImagePullFailed(BackendError):
    """The cluster could not pull the step image."""

    def __init__(self, message: str, *, session: str = "", job: str = "", image: str):
        self.image = image
        super().__init__(message, session=session, job=job)


class Unschedulable(BackendError):
    """No node can take the step's pod."""


class PodEvicted(BackendError):
    """The node evicted or deleted the step's pod before the step committed."""


class ClusterUnavailable(BackendError):
    """The Kubernetes API server could not be reached or refused the request."""
