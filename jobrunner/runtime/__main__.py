"""Entry point of the step runtime: ``python -m jobrunner.runtime``.

Exit codes: 0 when the attempt's result was recorded in the store (whatever the
step's status), 2 for bad arguments, 3 when the store could not be used, so that
no result could be recorded; the reason is then on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from jobrunner.errors import JobRunnerError, StoreUnavailable
from jobrunner.runtime._step import run_step
from jobrunner.store import CheckpointStore, validate_session_id

STORE_FAILED = 3
# Store options that may hold secrets come as JSON in this variable, never as
# arguments (see jobrunner.backends.base.runtime_environment).
STORE_OPTIONS_VARIABLE = "JOBRUNNER_STORE_OPTIONS"


def _option(text: str) -> tuple[str, Any]:
    key, separator, value = text.partition("=")
    if not separator or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except ValueError:
        return key, value


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m jobrunner.runtime",
        description="Run one step of a jobrunner session and commit its checkpoint.",
    )
    parser.add_argument("--store", required=True, help="the checkpoint store's URL")
    parser.add_argument("--session", required=True, help="the session id")
    parser.add_argument("--attempt", required=True, help="the attempt id")
    parser.add_argument(
        "--store-option",
        action="append",
        type=_option,
        default=[],
        metavar="KEY=VALUE",
        help="an option of the store's filesystem (JSON values are decoded)",
    )
    return parser.parse_args(argv)


def _secret_options() -> dict[str, Any]:
    text = os.environ.get(STORE_OPTIONS_VARIABLE)
    if not text:
        return {}
    try:
        options = json.loads(text)
    except ValueError:
        options = None
    if not isinstance(options, dict):
        # The value is not repeated: it holds secrets.
        raise StoreUnavailable(f"${STORE_OPTIONS_VARIABLE} is not a JSON object")
    return options


def main(argv: list[str] | None = None) -> int:
    arguments = _arguments(argv)
    try:
        validate_session_id(arguments.session)
        options = {**dict(arguments.store_option), **_secret_options()}
        store = CheckpointStore(arguments.store, options=options)
        run_step(store, arguments.session, arguments.attempt)
    except JobRunnerError as error:
        # The last line on stderr is the reason the control side reports.
        sys.stderr.write(f"jobrunner: {error}\n")
        return STORE_FAILED
    return 0


if __name__ == "__main__":
    sys.exit(main())
