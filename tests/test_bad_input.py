"""Bad input gets a clear error and loses nothing."""

from __future__ import annotations

import glob
import os
from collections.abc import Callable

import pytest

import jobrunner
from jobrunner import (
    CheckpointStore,
    InvalidInput,
    InvalidSessionId,
    Session,
    StoreUnavailable,
    UnknownSession,
    UnknownStep,
)


@pytest.mark.parametrize(
    "bad", ["../x", "A B", "", "a" * 64, "Upper", "-a", "a-", "a_b"]
)
def test_invalid_session_ids_are_refused_before_any_io(
    store_url: str, bad: str
) -> None:
    with pytest.raises(InvalidSessionId, match="invalid session id"):
        Session(bad, store=store_url)
    assert not os.path.exists(store_url)


def test_longest_valid_session_id(store_url: str) -> None:
    assert Session("a" * 63, store=store_url).run("1").status == "ok"


def test_unknown_session(store_url: str) -> None:
    session = Session("nobody", store=store_url)
    with pytest.raises(UnknownSession, match="no session 'nobody'"):
        session.history()
    with pytest.raises(UnknownSession):
        session.variables()


def test_unknown_step(new_session: Callable[..., Session]) -> None:
    session = new_session("known")
    session.run("x = 1")
    with pytest.raises(UnknownStep, match="has no step 5: its steps are 1 to 1"):
        session.variables(5)


def test_code_that_is_not_utf8(new_session: Callable[..., Session]) -> None:
    session = new_session()
    with pytest.raises(InvalidInput, match="not UTF-8"):
        session.run(b"x = '\xff\xfe'")
    assert session.run(b"'caf\xc3\xa9'").value == "'café'"


def test_binary_garbage_as_code_is_a_syntax_error(new_session: Callable[..., Session]):
    session = new_session()
    result = session.run(bytes(range(1, 128)).decode())
    assert result.status == "error"
    assert result.error is not None and result.error.type == "SyntaxError"


def _blob_path(store_url: str, digest: str) -> str:
    return os.path.join(store_url, "blobs", digest[:2], digest)


@pytest.mark.parametrize("damage", ["corrupt", "missing"])
def test_a_damaged_blob_fails_the_step_and_names_the_blob(
    new_session: Callable[..., Session], store_url: str, damage: str
) -> None:
    session = new_session("damaged")
    session.run("good = 1")
    session.run("bad = [1, 2, 3]")
    digest = session.store.manifest("damaged").variables["bad"]["blob"]
    path = _blob_path(store_url, digest)
    if damage == "corrupt":
        with open(path, "r+b") as file:
            file.write(b"\x00\x01")
    else:
        os.unlink(path)

    result = session.run("bad.append(4)")

    assert result.status == "error" and result.error is not None
    assert result.error.type == "CheckpointCorrupted"
    assert digest in result.error.message and "'bad'" in result.error.message
    assert session.head == 2
    assert [v.name for v in session.variables(1)] == ["good"]
    assert session.run("good + 1").value == "2"


def test_a_tampered_manifest_is_refused(
    new_session: Callable[..., Session], store_url: str
) -> None:
    session = new_session("tampered")
    session.run("x = 1")
    session.run("x = 2")
    (path,) = glob.glob(f"{store_url}/sessions/tampered/steps/*2.json")
    with open(path, "w") as file:
        file.write("{not json")

    result = session.run("x")

    assert result.status == "error" and result.error is not None
    assert "manifest of step 2" in result.error.message
    assert session.variables(1)[0].name == "x"


def test_a_store_whose_filesystem_is_not_installed() -> None:
    with pytest.raises(StoreUnavailable, match=r"install gcsfs to use gs:// stores"):
        CheckpointStore("gs://bucket/prefix")


def test_public_names_are_sorted_and_importable() -> None:
    assert jobrunner.__all__ == sorted(jobrunner.__all__)
    for name in jobrunner.__all__:
        assert getattr(jobrunner, name) is not None
