"""What every backend offers, and what it is given to start a step."""

from __future__ import annotations

import json
import re
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "STORE_OPTIONS_VARIABLE",
    "Backend",
    "OutputCallback",
    "StepExit",
    "StepLaunch",
    "is_secret_option",
    "runtime_arguments",
    "runtime_environment",
]

# Called with the stream name ("stdout" or "stderr") and a piece of text.
OutputCallback = Callable[[str, str], None]

RUNTIME_MODULE = "jobrunner.runtime"


# The store options that may hold secrets reach the runtime through this
# variable (JSON), never through its arguments: arguments show in `ps` and in a
# Job's spec, while a Kubernetes backend can put an environment variable in a
# Secret.
STORE_OPTIONS_VARIABLE = "JOBRUNNER_STORE_OPTIONS"
_SECRET_WORDS = re.compile(
    r"key|secret|token|passw|credential|auth|signature|private|cert", re.IGNORECASE
)
# A URL with a user name or password in it, such as https://user:pass@host/.
_URL_WITH_USER = re.compile(r"://[^/@]*@")


def is_secret_option(key: str, value: Any) -> bool:
    """Return True if a store option may hold a secret, in its key or its value.

    A nested mapping (``client_kwargs``, ``config_kwargs``...) is secret as a
    whole when any key inside it is; so is a URL that carries a user name.
    """
    if _SECRET_WORDS.search(key):
        return True
    if isinstance(value, dict):
        return any(is_secret_option(str(k), v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return any(is_secret_option("", item) for item in value)
    return isinstance(value, str) and bool(_URL_WITH_USER.search(value))


def runtime_arguments(
    store_url: str, store_options: dict[str, Any], session: str, attempt: str
) -> list[str]:
    """Return the runtime's arguments, the same for every backend.

    Only the store options that hold no secret are arguments; the others go
    through :func:`runtime_environment`.
    """
    arguments = ["--store", store_url, "--session", session, "--attempt", attempt]
    for key, value in sorted(store_options.items()):
        if not is_secret_option(key, value):
            arguments += ["--store-option", f"{key}={json.dumps(value)}"]
    return arguments


def runtime_environment(
    store_options: dict[str, Any], session_key: str | None
) -> dict[str, str]:
    """Return the environment that carries the runtime's secrets.

    Args:
        store_options: The store's options; those that may hold a secret are
            put in ``$JOBRUNNER_STORE_OPTIONS`` as JSON.
        session_key: The session's signing key, in the form the store reads
            from ``$JOBRUNNER_SESSION_KEY``, or None when manifests are not
            signed. The master key is blanked out: a step's process holds the
            key of its own session only.
    """
    environment: dict[str, str] = {}
    secret = {
        key: value
        for key, value in store_options.items()
        if is_secret_option(key, value)
    }
    if secret:
        environment[STORE_OPTIONS_VARIABLE] = json.dumps(secret, sort_keys=True)
    if session_key is not None:
        environment["JOBRUNNER_SESSION_KEY"] = session_key
        environment["JOBRUNNER_SIGNING_KEY"] = ""
        environment["JOBRUNNER_SIGNING_KEY_FILE"] = ""
    return environment


@dataclass(frozen=True)
class StepLaunch:
    """Everything a backend needs to start one attempt of a step.

    Attributes:
        session: The session id.
        attempt: The attempt id, unique per attempt.
        step: The step number the attempt hopes to commit (for naming only).
        arguments: The runtime's arguments (after ``python -m jobrunner.runtime``).
        environment: Extra environment variables for the runtime's process; they
            hold secrets (see :func:`runtime_environment`): never log them, and
            keep them out of anything that shows a process's or a Job's spec.
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
