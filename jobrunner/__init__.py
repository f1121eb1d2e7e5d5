"""jobrunner: a REPL-like Python session where every step is its own process.

Each step loads the session's namespace from a checkpoint, runs its code and
commits a new checkpoint; locally a subprocess runs the step, in production a
Kubernetes Job does.

    >>> from jobrunner import Session
    >>> result = Session("demo").run("x = 41\\nx + 1")
    >>> result.status, result.value
    ('ok', '42')

Public names are imported on first use, so that the step runtime, which lives in
this package, does not pay for the control side's imports.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from jobrunner.backends.base import Backend
    from jobrunner.backends.kubernetes import KubernetesBackend, KubernetesOptions
    from jobrunner.backends.local import LocalBackend
    from jobrunner.errors import (
        BackendError,
        CheckpointCorrupted,
        ClusterUnavailable,
        CommitConflict,
        ImagePullFailed,
        InvalidInput,
        InvalidSessionId,
        JobRunnerError,
        PodEvicted,
        StepCrashed,
        StepKilled,
        StoreError,
        StoreUnavailable,
        UnknownSession,
        UnknownStep,
        Unschedulable,
    )
    from jobrunner.notebook import CellRun, NotebookRun, run_notebook
    from jobrunner.result import StepError, StepResult, Timings
    from jobrunner.schedule import (
        NotebookSchedule,
        delete_schedule,
        list_schedules,
        schedule_notebook,
    )
    from jobrunner.session import (
        Session,
        Variable,
        delete_session,
        gc,
        list_sessions,
        raise_for_status,
    )
    from jobrunner.store import CheckpointStore, GcReport, NameChange, StepDiff

__version__ = "0.1.0"

_WHERE = {
    "Backend": "jobrunner.backends.base",
    "BackendError": "jobrunner.errors",
    "CellRun": "jobrunner.notebook",
    "CheckpointCorrupted": "jobrunner.errors",
    "CheckpointStore": "jobrunner.store",
    "ClusterUnavailable": "jobrunner.errors",
    "CommitConflict": "jobrunner.errors",
    "GcReport": "jobrunner.store",
    "ImagePullFailed": "jobrunner.errors",
    "InvalidInput": "jobrunner.errors",
    "InvalidSessionId": "jobrunner.errors",
    "JobRunnerError": "jobrunner.errors",
    "KubernetesBackend": "jobrunner.backends.kubernetes",
    "KubernetesOptions": "jobrunner.backends.kubernetes",
    "LocalBackend": "jobrunner.backends.local",
    "NameChange": "jobrunner.store",
    "NotebookRun": "jobrunner.notebook",
    "NotebookSchedule": "jobrunner.schedule",
    "PodEvicted": "jobrunner.errors",
    "Session": "jobrunner.session",
    "StepCrashed": "jobrunner.errors",
    "StepDiff": "jobrunner.store",
    "StepError": "jobrunner.result",
    "StepKilled": "jobrunner.errors",
    "StepResult": "jobrunner.result",
    "StoreError": "jobrunner.errors",
    "StoreUnavailable": "jobrunner.errors",
    "Timings": "jobrunner.result",
    "UnknownSession": "jobrunner.errors",
    "UnknownStep": "jobrunner.errors",
    "Unschedulable": "jobrunner.errors",
    "Variable": "jobrunner.session",
    "delete_schedule": "jobrunner.schedule",
    "delete_session": "jobrunner.session",
    "gc": "jobrunner.session",
    "list_schedules": "jobrunner.schedule",
    "list_sessions": "jobrunner.session",
    "raise_for_status": "jobrunner.session",
    "run_notebook": "jobrunner.notebook",
    "schedule_notebook": "jobrunner.schedule",
}

__all__ = [
    "Backend",
    "BackendError",
    "CellRun",
    "CheckpointCorrupted",
    "CheckpointStore",
    "ClusterUnavailable",
    "CommitConflict",
    "GcReport",
    "ImagePullFailed",
    "InvalidInput",
    "InvalidSessionId",
    "JobRunnerError",
    "KubernetesBackend",
    "KubernetesOptions",
    "LocalBackend",
    "NameChange",
    "NotebookRun",
    "NotebookSchedule",
    "PodEvicted",
    "Session",
    "StepCrashed",
    "StepDiff",
    "StepError",
    "StepKilled",
    "StepResult",
    "StoreError",
    "StoreUnavailable",
    "Timings",
    "UnknownSession",
    "UnknownStep",
    "Unschedulable",
    "Variable",
    "delete_schedule",
    "delete_session",
    "gc",
    "list_schedules",
    "list_sessions",
    "raise_for_status",
    "run_notebook",
    "schedule_notebook",
]


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'jobrunner' has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
