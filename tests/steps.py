"""Helpers that test files share for running steps."""

from __future__ import annotations

from jobrunner import Session


def run_all(session: Session, *steps: str) -> str | None:
    """Run steps in order, each must commit; return the last step's value."""
    result = None
    for code in steps:
        result = session.run(code)
        assert result.status == "ok", (code, result.error)
    assert result is not None
    return result.value
