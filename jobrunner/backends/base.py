"""What every backend offers, and what it is given to start a step."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Backend", "OutputCallback", "StepExit", "StepLaunch", "runtime_arguments"]

# Called with the stream name ("stdout" or "stderr") and a piece of text.
OutputCallback = Callable[[str, str], None]

RUNTIME_MODULE = "jobrunner.runtime"


def runtime_arguments(
    store_url: str, store_options: dict[str, Any], session: str, attempt: str
) -> list[str]:
    """Return the runtime's arguments, the same for every backend."""
    import json

    arguments = ["--store", store_url, "--session", session, "--attempt", attempt]
    for key, value in sorted(store_options.items()):
        arguments += ["--store-option", f"{key}={json.dumps(value)}"]
    return arguments


@dataclass(frozen=True)
class StepLaunch:
    """Everything a backend needs to start one attempt of a step.

    Attributes:
        session: The session id.
        attempt: The attempt id, unique per attempt.
        step: The step number the attempt hopes to commit (for naming only).
        arguments: The runtime's arguments (after ``python -m jobrunner.runtime``).
        environment: Extra environment variables; may hold secrets, never logged.
        timeout: Seconds after which the step is stopped, or None.
    """

    session: str
    attempt: str
    step: int
    arguments: list[str]
    environment: dict[str, str] = field(default_factory=dict, repr=False)
    timeout: float | None = None


@dataclass(frozen=True)
class StepExit:
    """How the step's process ended, as far as the backend can tell.

    Attributes:
        reason: ``exited`` (the process ended by itself), ``timeout``,
            ``cancelled``, ``oom`` (killed for memory), or ``killed``.
        exit_code: The process's exit code, when it has one.
        message: One sentence for the user when the reason is not ``exited``.
        stderr_tail: The last lines the process wrote to stderr.
    """

    reason: str
    exit_code: int | None = None
    message: str = ""
    stderr_tail: str = ""


class Backend(ABC):
    """Runs step runtimes somewhere: a local process, a Kubernetes Job..."""

    name = "backend"

    @abstractmethod
    def run(self, launch: StepLaunch, on_output: OutputCallback | None) -> StepExit:
        """Start the step runtime, stream its output, wait for it to end."""

    @abstractmethod
    def cancel(self, session: str | None = None) -> int:
        """Stop the running steps (of one session, or all); return how many."""

    def environment(self, session: str) -> dict[str, str]:
        """Return the environment a step of ``session`` needs from the caller."""
        return {}
