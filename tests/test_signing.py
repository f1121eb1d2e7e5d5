"""Signed checkpoints: what was tampered with is refused, by name, and the
session's good steps stay readable. Run on a local folder and on S3."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from s3server import S3Server, s3_server  # noqa: F401 (a fixture)

from jobrunner import Session
from jobrunner.store import CheckpointStore, SessionKey, session_key

pytestmark = pytest.mark.timeout(120)
MASTER = "test-master-signing-key"


@pytest.fixture(params=["file", "s3"])
def location(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, Any]:
    if request.param == "file":
        return str(tmp_path / "store"), {}
    server: S3Server = request.getfixturevalue("s3_server")
    server.reset_faults()
    return f"s3://{server.new_bucket()}/store", {"endpoint_url": server.endpoint}


@pytest.fixture
def signed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JOBRUNNER_SIGNING_KEY", MASTER)


def _session(location: tuple[str, Any], name: str = "signed") -> Session:
    url, options = location
    return Session(name, store=url, store_options=options)


def _manifest_path(session: str, step: int) -> str:
    return f"sessions/{session}/steps/{step:010d}.json"


def _refused(session: Session, code: str, named: str) -> None:
    result = session.run(code)
    assert result.status == "error"
    assert result.error is not None
    assert result.error.type == "CheckpointCorrupted", result.error
    assert named in result.error.message


def _edit(store: CheckpointStore, path: str, change: Any) -> bytes:
    original = store.files.read(path)
    data = json.loads(original)
    change(data)
    store.files.write(path, json.dumps(data).encode())
    return original


@pytest.mark.usefixtures("signed")
def test_a_changed_blob_is_refused_and_the_steps_stay_readable(
    location: tuple[str, Any],
) -> None:
    session = _session(location)
    assert session.run("x = [1, 2]").status == "ok"
    digest = session.store.manifest(session.id).variables["x"]["blob"]
    path = f"blobs/{digest[:2]}/{digest}"
    original = session.store.files.read(path)
    session.store.files.write(path, original.replace(b"K\x02", b"K\x03"))
    _refused(session, "x", digest)
    assert [v.name for v in session.variables(1)] == ["x"]
    session.store.files.write(path, original)
    assert session.run("x").value == "[1, 2]"


@pytest.mark.usefixtures("signed")
@pytest.mark.parametrize(
    "change",
    [
        pytest.param(lambda d: d["variables"]["x"].update(type="str"), id="edited"),
        pytest.param(lambda d: d.pop("signature"), id="unsigned"),
    ],
)
def test_a_changed_manifest_is_refused(location: tuple[str, Any], change: Any) -> None:
    session = _session(location)
    session.run("x = 1")
    session.run("x = 2")
    path = _manifest_path(session.id, 2)
    original = _edit(session.store, path, change)
    _refused(session, "x", path)
    assert [v.name for v in session.variables(1)] == ["x"]
    session.store.files.write(path, original)
    assert session.run("x").value == "2"


@pytest.mark.usefixtures("signed")
def test_a_manifest_grafted_from_another_session_is_refused(
    location: tuple[str, Any],
) -> None:
    donor, target = _session(location, "donor"), _session(location, "target")
    donor.run("secret = 'donor'")
    target.run("x = 1")
    grafted = _manifest_path("target", 2)
    target.store.files.write(
        grafted, donor.store.files.read(_manifest_path("donor", 1))
    )
    _refused(target, "x", "written for session 'donor'")

    def disguise(data: dict[str, Any]) -> None:
        data.update(session="target", step=2)

    _edit(target.store, grafted, disguise)
    _refused(target, "x", "signature does not match")
    assert [v.name for v in target.variables(1)] == ["x"]
    target.store.files.remove(grafted)
    assert target.run("x + 1").value == "2"


def test_without_a_key_digests_are_still_checked(location: tuple[str, Any]) -> None:
    session = _session(location, "unsigned")
    session.run("x = 'abc'")
    digest = session.store.manifest(session.id).variables["x"]["blob"]
    path = f"blobs/{digest[:2]}/{digest}"
    session.store.files.write(path, session.store.files.read(path) + b".")
    _refused(session, "x", digest)


@pytest.mark.usefixtures("signed")
def test_a_step_gets_its_sessions_key_only(location: tuple[str, Any]) -> None:
    session = _session(location, "holder")
    environment = session._environment()
    derived = SessionKey("holder", session_key(MASTER.encode(), "holder"))
    assert environment["JOBRUNNER_SESSION_KEY"] == derived.to_text()
    assert environment["JOBRUNNER_SIGNING_KEY"] == ""
    assert MASTER not in json.dumps(environment)
    assert session.run("x = 1").status == "ok"  # the step signed with it
    url, options = location
    verifier = CheckpointStore(url, options=options, signing_key=MASTER)
    assert verifier.manifest("holder").step == 1
