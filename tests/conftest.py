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
from jobrunner.backends.local import LocalBackend

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


@pytest.fixture(params=["spawn", "warm"])
def backend(request: pytest.FixtureRequest) -> Iterator[LocalBackend]:
    """The local backend in both of its modes: a new interpreter, or a fork."""
    backend = LocalBackend(warm=request.param == "warm")
    yield backend
    backend.close()


@pytest.fixture
def new_session(store_url: str, backend: LocalBackend) -> Callable[..., Session]:
    """Make sessions on the test's store and backend: ``new_session("a")``."""

    def make(session_id: str = "test") -> Session:
        return Session(session_id, store=store_url, backend=backend)

    return make
