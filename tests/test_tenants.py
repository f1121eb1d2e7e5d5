"""Tenants: code in a step of one session cannot make another session load
anything it wrote, and a step holds its own session's key only.

Every forgery here is written by a real step of session ``tenant-a``, with the
store access and key its process has, into the folder of session ``tenant-b``,
as code that turned hostile would. Session B must then refuse with a clear
error or ignore the forgery, keep its committed steps readable, and work again
once the forgery is gone. Run on a local folder and on S3.
"""

from __future__ import annotations

import ast
import hashlib
import hmac
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from s3server import S3Server, s3_server  # noqa: F401 (a fixture)

from jobrunner import Session
from jobrunner.backends.base import StepLaunch
from jobrunner.backends.local import LocalBackend
from jobrunner.result import StepResult
from jobrunner.store import CheckpointStore, session_key

pytestmark = pytest.mark.timeout(240)

MASTER = "tenants-master-signing-key"
A, B = "tenant-a", "tenant-b"
B_STATE = "[1, 2, 3, 4]"
# The helpers a hostile step of session A uses; all of it lives inside one
# function, so that nothing of it is left in A's namespace to be saved.
ATTACK = """
def attack():
    import hashlib, hmac, json, os
    from jobrunner.store import CheckpointStore, SessionKey

    files = CheckpointStore({url!r}, options={options!r}).files
    own = SessionKey.from_text(os.environ["JOBRUNNER_SESSION_KEY"])

    def sign(data):
        text = json.dumps(data, sort_keys=True, separators=(",", ":")).encode()
        return hmac.new(own.key, text, hashlib.sha256).hexdigest()

{body}
    return "done"

outcome = attack()
del attack
outcome
"""


@pytest.fixture(params=["file", "s3"])
def location(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, Any]:
    if request.param == "file":
        return str(tmp_path / "store"), {}
    server: S3Server = request.getfixturevalue("s3_server")
    server.reset_faults()
    return f"s3://{server.new_bucket()}/store", {"endpoint_url": server.endpoint}


@pytest.fixture(autouse=True)
def signed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JOBRUNNER_SIGNING_KEY", MASTER)


@pytest.fixture
def warm() -> Iterator[LocalBackend]:
    backend = LocalBackend(warm=True)
    yield backend
    backend.close()


def _blob_path(digest: str) -> str:
    return f"blobs/{digest[:2]}/{digest}"


def _manifest_path(session: str, step: int) -> str:
    return f"sessions/{session}/steps/{step:010d}.json"


def _refused(result: StepResult, named: str) -> None:
    assert result.status == "error", result
    assert result.error is not None
    assert result.error.type == "CheckpointCorrupted", result.error
    assert named in result.error.message


class Tenants:
    """Sessions A and B on one store, and an outside verifier of B's steps."""

    def __init__(self, location: tuple[str, Any], backend: LocalBackend) -> None:
        self.url, self.options = location
        self.a = Session(A, store=self.url, store_options=self.options, backend=backend)
        self.b = Session(B, store=self.url, store_options=self.options, backend=backend)
        self.verifier = CheckpointStore(
            self.url, options=self.options, signing_key=MASTER
        )
        self.files = self.verifier.files
        assert self.b.run("x = [1, 2, 3]\nsecret = 'b only'").status == "ok"
        assert self.b.run("x.append(4)").status == "ok"
        assert self.a.run("y = 'from a'").status == "ok"
        self.good = 2  # B's last step committed before any forgery

    def attack(self, body: str) -> None:
        """Run ``body`` (indented, inside ``attack()``) as a step of A."""
        code = ATTACK.format(url=self.url, options=self.options, body=body)
        result = self.a.run(code)
        assert (result.status, result.value) == ("ok", "'done'"), result.error

    def b_is_intact(self) -> None:
        """B's last good step still verifies and B's next step sees its state."""
        manifest = self.verifier.manifest(B, self.good)
        assert {"secret", "x"} <= set(manifest.variables)
        result = self.b.run("x")
        assert (result.status, result.value) == ("ok", B_STATE), result.error
        assert result.step is not None
        self.good = result.step


def test_a_step_holds_its_own_sessions_key_only(
    location: tuple[str, Any], warm: LocalBackend
) -> None:
    tenants = Tenants(location, warm)
    b_key = session_key(MASTER.encode(), B).hex()
    code = f"""
import os
from jobrunner.errors import StoreError
from jobrunner.store import CheckpointStore
with open("/proc/self/environ", "rb") as environ:
    initial = environ.read()
try:
    CheckpointStore({tenants.url!r}, options={tenants.options!r}).key_for_session(
        {B!r}
    )
    signing_b = "allowed"
except StoreError as error:
    signing_b = str(error)
seen = (
    os.environ.get("JOBRUNNER_SIGNING_KEY"),
    os.environ.get("JOBRUNNER_SIGNING_KEY_FILE"),
    os.environ["JOBRUNNER_SESSION_KEY"].partition(":")[0],
    {MASTER.encode()!r} in initial or any(
        {MASTER!r} in value for value in os.environ.values()
    ),
    {b_key.encode()!r} in initial or any(
        {b_key!r} in value for value in os.environ.values()
    ),
    signing_b,
)
del initial, os, StoreError, CheckpointStore, environ
seen
"""
    result = tenants.a.run(code)
    assert result.status == "ok", result.error
    signing, signing_file, holder, master, other, signing_b = ast.literal_eval(
        result.value or ""
    )
    assert (signing, signing_file, holder) == ("", "", A)
    assert not master, "the master key reached a step"
    assert not other, "another session's key reached a step"
    assert f"signing key of session {A!r} only" in signing_b


def test_a_forged_manifest_signed_with_another_sessions_key_is_refused(
    location: tuple[str, Any], warm: LocalBackend
) -> None:
    tenants = Tenants(location, warm)
    forged = _manifest_path(B, 3)
    # A's own committed manifest, its variable renamed to B's, made out to B's
    # next step and signed with the only key A has.
    tenants.attack(f"""
    data = json.loads(files.read({_manifest_path(A, 1)!r}))
    data.pop("signature")
    data["variables"] = {{"x": data["variables"]["y"]}}
    data.update(session={B!r}, step=3)
    data["signature"] = sign(data)
    files.write({forged!r}, json.dumps(data).encode())
""")
    _refused(tenants.b.run("x"), "its signature does not match its content")
    assert tenants.verifier.manifest(B, 2).step == 2
    tenants.files.remove(forged)
    tenants.b_is_intact()


def test_an_overwritten_blob_is_refused_and_never_unpickled(
    location: tuple[str, Any], warm: LocalBackend, tmp_path: Path
) -> None:
    tenants = Tenants(location, warm)
    digest = tenants.verifier.manifest(B).variables["x"]["blob"]
    original = tenants.files.read(_blob_path(digest))
    marker = tmp_path / "unpickled"
    # A pickle that leaves a file behind if anything ever loads it.
    tenants.attack(f"""
    import pickle

    class Trap:
        def __reduce__(self):
            return (open, ({str(marker)!r}, "w"))

    files.write({_blob_path(digest)!r}, pickle.dumps({{"x": Trap()}}))
""")
    _refused(tenants.b.run("x"), digest)
    assert not marker.exists()
    assert set(tenants.verifier.manifest(B, 2).variables) == {"secret", "x"}
    tenants.files.write(_blob_path(digest), original)
    tenants.b_is_intact()


def test_a_blob_planted_under_the_digest_of_a_future_value_is_replaced(
    location: tuple[str, Any], warm: LocalBackend, tmp_path: Path
) -> None:
    tenants = Tenants(location, warm)
    # Small values are guessable: A learns the digest of B's next blob by
    # saving the same value itself, elsewhere.
    scout = Session("scout", store=str(tmp_path / "scout"), backend=warm)
    assert scout.run("z = [7, 7, 7]").status == "ok"
    digest = scout.store.manifest("scout").variables["z"]["blob"]
    tenants.attack(f"""
    files.write({_blob_path(digest)!r}, b"planted by tenant a")
""")
    result = tenants.b.run("z = [7, 7, 7]")
    assert result.status == "ok", result.error
    assert tenants.verifier.manifest(B).variables["z"]["blob"] == digest
    assert tenants.b.run("z").value == "[7, 7, 7]"
    tenants.good = tenants.b.head
    tenants.b_is_intact()


def test_new_blobs_a_rewritten_head_and_forged_records_are_ignored(
    location: tuple[str, Any], warm: LocalBackend
) -> None:
    tenants = Tenants(location, warm)
    forged_attempt = "20260101t000000000-0000f00d"
    record = {
        "session": B,
        "attempt": forged_attempt,
        "status": "ok",
        "code": "x = 'forged'",
        "value": "'forged'",
    }
    blob = "0" * 64
    tenants.attack(f"""
    files.write({_blob_path(blob)!r}, b"a blob that nothing lists")
    files.write("sessions/{B}/HEAD", b"999")
    files.write("sessions/{B}/attempts/{forged_attempt}.json",
                json.dumps({record!r}).encode())
""")
    tenants.b_is_intact()
    for hint in (b"1", b"0", b"-3", b"not a number"):
        tenants.files.write(f"sessions/{B}/HEAD", hint)
        tenants.b_is_intact()
    listed = tenants.files.list(f"sessions/{B}/steps")
    assert tenants.b.head == len(listed)
    # Attempt records are not signed: the forged one shows in B's history
    # (and nowhere else); it is not a step and B's state never read it.
    forged = [r for r in tenants.b.history() if r.attempt == forged_attempt]
    assert [r.value for r in forged] == ["'forged'"]
    assert all(r.value != "'forged'" for r in tenants.b.history() if r.step is not None)


class RacingBackend(LocalBackend):
    """Lets tenant A win the race for B's request: between the caller writing
    it and B's step reading it, A overwrites it with its own code, signed with
    A's key (A has listed B's requests, which it can when it can write there).
    """

    def __init__(self, url: str, options: dict[str, Any]) -> None:
        super().__init__(warm=True)
        self.files = CheckpointStore(url, options=options).files
        self.a_key = session_key(MASTER.encode(), A)

    def run(self, launch: StepLaunch, on_output: Any) -> Any:
        if launch.session == B:
            request = {"code": "secret = 'stolen'", "output_limit": None}
            text = json.dumps(
                {"request": request, "session": B, "attempt": launch.attempt},
                sort_keys=True,
                separators=(",", ":"),
            ).encode()
            request["signature"] = hmac.new(
                self.a_key, text, hashlib.sha256
            ).hexdigest()
            path = f"sessions/{B}/requests/{launch.attempt}.json"
            self.files.write(path, json.dumps(request).encode())
        return super().run(launch, on_output)


def test_a_request_overwritten_by_another_session_is_not_run(
    location: tuple[str, Any], warm: LocalBackend
) -> None:
    tenants = Tenants(location, warm)
    url, options = location
    racing = RacingBackend(url, options)
    try:
        hijacked = Session(B, store=url, store_options=options, backend=racing)
        _refused(hijacked.run("x"), "refused the request")
    finally:
        racing.close()
    assert tenants.verifier.manifest(B).step == 2
    tenants.b_is_intact()
    assert tenants.b.run("secret").value == "'b only'"


def test_unsigned_requests_of_an_unsigned_store_still_run(
    tmp_path: Path, warm: LocalBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("JOBRUNNER_SIGNING_KEY")
    session = Session("plain", store=str(tmp_path / "store"), backend=warm)
    assert session.run("x = 1\nx").value == "1"
    assert "JOBRUNNER_SESSION_KEY" not in os.environ
