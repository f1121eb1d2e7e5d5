"""Steps in real containers of the step image, through the Kubernetes backend.

The test API server's kubelet runs in container mode here: every step's pod
becomes a container of the step image, with the pod's user, read-only root,
volumes, environment and limits, on the host's network. A session must give
the same results as on the local backend, whether its store is a folder (a
claim bound to it) or a bucket (moto, reached over the host's loopback); a
memory-hungry step is killed by the kernel, and a missing image fails a real
pull.
"""

# ruff: noqa: F811 - pytest fixtures imported from s3server are test parameters

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from container_engine import (
    ContainerEngine,
    ensure_step_image,
    make_writable_for_step,
    require_engine,
)
from kubeserver import KubeServer
from s3server import CREDENTIALS, S3Store, s3_server, s3_store  # noqa: F401 (fixtures)

from jobrunner import ImagePullFailed, Session, StepResult
from jobrunner.backends.kubernetes import KubernetesBackend
from jobrunner.backends.local import LocalBackend

# The first build of the image bootstraps a Debian base: minutes, once per machine.
pytestmark = [pytest.mark.container, pytest.mark.timeout(1800)]

STEPS = [
    # A function and a class that uses it, and an instance.
    "def square(x):\n    return x * x\n\n"
    "class Point:\n    def __init__(self, x, y):\n        self.x, self.y = x, y\n"
    "    def norm2(self):\n        return square(self.x) + square(self.y)\n\n"
    "p = Point(3, 4)\np.norm2()",
    # Two names for one list.
    "a = [1, 2]\nb = a\nb.append(3)\nprint(len(a), 'items')",
    # A step that raises changes nothing.
    "assert isinstance(p, Point) and a is b\nb.append('lost')\n1 / 0",
    "p.x = 6\na.append(p.norm2())\nprint(b)\na",
]


@pytest.fixture(scope="module")
def engine() -> ContainerEngine:
    return require_engine()


@pytest.fixture(scope="module")
def image(engine: ContainerEngine) -> str:
    return ensure_step_image(engine)


@pytest.fixture(scope="module")
def server(engine: ContainerEngine) -> Iterator[KubeServer]:
    with KubeServer(runtime="container", engine=engine) as running:
        yield running


@pytest.fixture
def kubeconfig(server: KubeServer, tmp_path: Path) -> str:
    return str(server.write_kubeconfig(tmp_path / "kubeconfig", context="test"))


@pytest.fixture
def make_backend(kubeconfig: str, image: str) -> Callable[..., KubernetesBackend]:
    def make(**options: Any) -> KubernetesBackend:
        settings: dict[str, Any] = {"image": image, "schedule_timeout": 10.0}
        settings.update(options)
        return KubernetesBackend(kubeconfig=kubeconfig, context="test", **settings)

    return make


@pytest.fixture
def folder_store(server: KubeServer, tmp_path: Path) -> tuple[str, str]:
    """A store folder bound to a claim of its own: (store path, claim name)."""
    folder = tmp_path / "store"
    folder.mkdir()
    make_writable_for_step(folder)
    claim = f"store-{uuid.uuid4().hex[:8]}"
    server.claims[claim] = folder
    return str(folder), claim


def _summary(result: StepResult) -> dict[str, Any]:
    return {
        "status": result.status,
        "value": result.value,
        "stdout": result.stdout,
        "created": sorted(result.created),
        "changed": sorted(result.changed),
        "error": (result.error.type, result.error.message) if result.error else None,
        "step": result.step,
    }


def _run_all(session: Session) -> list[dict[str, Any]]:
    return [_summary(session.run(code)) for code in STEPS]


def _expected(tmp_path: Path) -> list[dict[str, Any]]:
    backend = LocalBackend()
    try:
        session = Session("same", store=str(tmp_path / "local"), backend=backend)
        return _run_all(session)
    finally:
        backend.close()


def test_a_session_on_a_folder_matches_the_local_backend(
    make_backend: Callable[..., KubernetesBackend],
    folder_store: tuple[str, str],
    server: KubeServer,
    tmp_path: Path,
) -> None:
    store, claim = folder_store
    session = Session("same", store=store, backend=make_backend(store_claim=claim))

    results = _run_all(session)

    assert results == _expected(tmp_path)
    assert results[-1]["value"] == "[1, 2, 3, 52]"
    assert results[2]["error"][0] == "ZeroDivisionError"
    identity = session.run("import os, sys\n(os.getuid(), os.getgid(), sys.prefix)")
    assert identity.value == "(10001, 10001, '/opt/venv')", "ran in the image"
    root = session.run("open('/opt/written', 'w')")
    assert root.error is not None and "Read-only file system" in root.error.message


def test_a_session_on_s3_matches_the_local_backend(
    make_backend: Callable[..., KubernetesBackend],
    s3_store: S3Store,
    tmp_path: Path,
) -> None:
    # The credentials reach the container only through the step's Secret: a
    # container, unlike a local process, inherits nothing from this process.
    options = {
        **s3_store.options,
        "key": CREDENTIALS["AWS_ACCESS_KEY_ID"],
        "secret": CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
    }
    session = Session(
        "same", store=s3_store.url, store_options=options, backend=make_backend()
    )

    assert _run_all(session) == _expected(tmp_path)


def test_a_memory_hungry_step_is_oom_killed_by_the_kernel(
    make_backend: Callable[..., KubernetesBackend],
    folder_store: tuple[str, str],
    server: KubeServer,
) -> None:
    store, claim = folder_store
    backend = make_backend(store_claim=claim, memory_limit="64Mi")
    session = Session("hungry", store=store, backend=backend)
    assert session.run("x = 1").status == "ok", "the runtime fits in 64Mi"

    result = session.run("x = 2\nblocks = [bytearray(2**20) for _ in range(256)]")

    assert result.status == "killed" and result.error is not None
    assert result.error.type == "OutOfMemory"
    # The backend says OOM only for a container terminated as OOMKilled, and
    # no fault was injected: the kernel killed it.
    assert "OOM-killed at 64Mi" in result.error.message
    assert session.run("x").value == "1", "the killed step changed nothing"


def test_an_image_that_does_not_exist_fails_a_real_pull(
    make_backend: Callable[..., KubernetesBackend],
    folder_store: tuple[str, str],
    server: KubeServer,
) -> None:
    store, claim = folder_store
    # .invalid never resolves: the engine's pull fails without any registry.
    image = "registry.invalid/jobrunner/step:missing"
    session = Session(
        "missing", store=store, backend=make_backend(store_claim=claim, image=image)
    )

    with pytest.raises(ImagePullFailed, match=r"registry\.invalid") as raised:
        session.run("x = 1")

    assert raised.value.image == image
    assert session.head == 0
    failures = [
        event["message"]
        for event in server.events()
        if event["reason"] == "Failed" and "registry.invalid" in event["message"]
    ]
    assert failures, "the kubelet recorded the engine's pull error"
