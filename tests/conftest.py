"""Fixtures shared by the whole suite.

Every test gets its own store folder; nothing reads the developer's
./checkpoints or their JOBRUNNER_* settings.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from jobrunner import Session

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("JOBRUNNER_"):
            monkeypatch.delenv(name)


@pytest.fixture
def store_url(tmp_path: Path) -> str:
    """A fresh local store folder."""
    return str(tmp_path / "store")


@pytest.fixture
def new_session(store_url: str) -> Iterator[Callable[..., Session]]:
    """Make sessions on the test's store: ``new_session("a")``."""

    def make(session_id: str = "test", **options: object) -> Session:
        return Session(session_id, store=store_url, **options)  # type: ignore[arg-type]

    yield make
