"""The structured record of one step, as every caller receives it.

The step runtime writes it to the store; the store copy is the truth, and the
backends' logs are only for watching. It is plain data (JSON in the store) so
that the runtime can build it without importing anything heavy.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

__all__ = ["OK", "STATUSES", "StepError", "StepResult", "Timings"]

OK = "ok"
# ok: committed. error: the code raised (nothing committed). conflict: another
# step committed first. timeout, killed: the process was stopped before it
# committed. Every status but ok leaves the session's state as it was.
STATUSES = ("ok", "error", "conflict", "timeout", "killed")


@dataclass(frozen=True)
class StepError:
    """What went wrong in a step: the exception's type, message and traceback."""

    type: str
    message: str
    traceback: str = ""

    def __str__(self) -> str:
        return f"{self.type}: {self.message}" if self.message else self.type


@dataclass(frozen=True)
class Timings:
    """Seconds spent loading the namespace, executing the code and saving."""

    load: float = 0.0
    execute: float = 0.0
    save: float = 0.0


@dataclass(frozen=True)
class StepResult:
    """The outcome of one step.

    Attributes:
        session: The session the step ran in.
        attempt: The id of this attempt, unique across all steps.
        status: One of ``ok``, ``error``, ``conflict``, ``timeout``, ``killed``.
        code: The step's source code.
        base_step: The committed step the namespace was loaded from (0: empty).
        step: The step number this attempt committed, or None.
        stdout: What the code printed (capped; a marker says what was cut).
        stderr: What the code wrote to stderr (capped likewise).
        value: The repr of a trailing expression's value, like a REPL, or None.
        error: What the code raised, or why the step did not commit.
        created: Names the step bound that did not exist before.
        changed: Names whose value the step changed.
        deleted: Names the step removed.
        dropped: Names left out of the checkpoint, each with the reason.
        timings: Seconds spent loading, executing and saving.
        started: When the step began, as an ISO 8601 UTC time.
        bytes_written: Bytes of new blobs the commit wrote to the store.
        outputs: Rich outputs (for example ``image/png``), MIME type to data.
    """

    session: str
    attempt: str
    status: str
    code: str
    base_step: int = 0
    step: int | None = None
    stdout: str = ""
    stderr: str = ""
    value: str | None = None
    error: StepError | None = None
    created: tuple[str, ...] = ()
    changed: tuple[str, ...] = ()
    deleted: tuple[str, ...] = ()
    dropped: dict[str, str] = field(default_factory=dict)
    timings: Timings = field(default_factory=Timings)
    started: str = ""
    bytes_written: int = 0
    outputs: tuple[dict[str, str], ...] = ()

    @property
    def ok(self) -> bool:
        """True when the step ran without error and committed."""
        return self.status == OK

    def to_dict(self) -> dict[str, Any]:
        """Return the result as JSON-ready data."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StepResult:
        """Rebuild a result from :meth:`to_dict` data; unknown keys are ignored."""
        known = {f.name for f in dataclasses.fields(cls)}
        values = {key: value for key, value in data.items() if key in known}
        error = values.get("error")
        values["error"] = StepError(**error) if error else None
        values["timings"] = Timings(**values.get("timings", {}))
        for name in ("created", "changed", "deleted"):
            values[name] = tuple(values.get(name, ()))
        values["outputs"] = tuple(values.get("outputs", ()))
        return cls(**values)
