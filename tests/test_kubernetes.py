"""The Kubernetes backend through the official client, over HTTP, against the
test API server, whose kubelet runs each pod's command as a local process."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from kubeserver import KubeServer

from jobrunner import ImagePullFailed, Session, Unschedulable
from jobrunner.backends import kubernetes as kube
from jobrunner.backends.kubernetes import KubernetesBackend, KubernetesOptions


@pytest.fixture(scope="module")
def server() -> Iterator[KubeServer]:
    with KubeServer() as running:
        yield running


@pytest.fixture
def kubeconfig(server: KubeServer, tmp_path: Path) -> str:
    return str(server.write_kubeconfig(tmp_path / "kubeconfig", context="test"))


@pytest.fixture
def make_backend(kubeconfig: str) -> Callable[..., KubernetesBackend]:
    def make(**options: Any) -> KubernetesBackend:
        settings = {"image": "jobrunner-step:test", "schedule_timeout": 2.0}
        settings.update(options)
        return KubernetesBackend(kubeconfig=kubeconfig, context="test", **settings)

    return make


@pytest.fixture
def kube_session(
    make_backend: Callable[..., KubernetesBackend], store_url: str
) -> Callable[..., Session]:
    def make(session_id: str = "kube", **options: Any) -> Session:
        return Session(session_id, store=store_url, backend=make_backend(**options))

    return make


def _job_of(server: KubeServer, session: str) -> dict[str, Any]:
    (job,) = [
        job
        for job in server.jobs()
        if job["metadata"]["labels"].get("jobrunner.io/session") == session
    ][-1:]
    return job


def test_a_session_runs_step_by_step_as_jobs(
    kube_session: Callable[..., Session], server: KubeServer
) -> None:
    session = kube_session("multi")
    output: list[str] = []
    steps = [
        "import math\nr = 2",
        "def area(): return math.pi * r ** 2",
        "print('computing')\nr = 3\narea()",
    ]
    results = [
        session.run(code, on_output=lambda _, text: output.append(text))
        for code in steps
    ]

    assert [result.status for result in results] == ["ok", "ok", "ok"]
    assert results[-1].value == "28.274333882308138"
    assert results[-1].stdout == "computing\n"
    assert "computing" in "".join(output), "the pod's log is streamed"
    names = {job["metadata"]["name"] for job in server.jobs()}
    assert {f"multi-s{n}-{r.attempt[-8:]}" for n, r in enumerate(results, 1)} <= names


def test_the_job_is_hardened_and_labelled(
    kube_session: Callable[..., Session], server: KubeServer
) -> None:
    session = kube_session("spec", memory_limit="256Mi", cpu_limit="500m")
    assert session.run("x = 1", timeout=120).status == "ok"
    job = _job_of(server, "spec")

    labels = job["metadata"]["labels"]
    assert labels["app.kubernetes.io/managed-by"] == "jobrunner"
    assert labels["jobrunner.io/step"] == "1"
    spec = job["spec"]
    assert (spec["backoffLimit"], spec["activeDeadlineSeconds"]) == (0, 120)
    assert spec["ttlSecondsAfterFinished"] > 0
    pod = spec["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    assert pod["automountServiceAccountToken"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    (container,) = pod["containers"]
    assert container["command"] == ["python", "-m", "jobrunner.runtime"]
    assert container["args"][:2] == ["--store", session.store.url]
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert container["resources"]["limits"] == {"cpu": "500m", "memory": "256Mi"}
    assert {"name": "scratch", "mountPath": "/tmp"} in container["volumeMounts"]


def test_secrets_travel_in_a_secret_not_in_the_job(
    kube_session: Callable[..., Session],
    server: KubeServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("JOBRUNNER_SIGNING_KEY", "master-signing-key-value")
    session = kube_session("secret")
    assert session.run("x = 1").status == "ok"
    assert session.run("x + 1").value == "2"

    job = _job_of(server, "secret")
    assert "signing-key-value" not in repr(job)
    (container,) = job["spec"]["template"]["spec"]["containers"]
    refs = [env for env in container["env"] if "valueFrom" in env]
    assert refs and all("secretKeyRef" in env["valueFrom"] for env in refs)
    leftover = [
        s
        for s in server.objects("secrets")
        if s["metadata"]["name"].startswith("secret-")
    ]
    assert leftover == [], "the step's Secret is deleted after the step"


def test_api_requests_per_successful_step(
    kube_session: Callable[..., Session], server: KubeServer
) -> None:
    session = kube_session("count")
    session.run("x = 0")
    server.reset_requests()
    assert session.run("import time\nx += 1\ntime.sleep(2)").status == "ok"
    requests = server.requests
    assert len(requests) <= 6, requests


def test_oom_killed_step_is_diagnosed_and_changes_nothing(
    kube_session: Callable[..., Session], server: KubeServer
) -> None:
    session = kube_session("oom", memory_limit="128Mi")
    session.run("x = 1")
    server.inject("oom", job="oom-.*", after=0.5)

    result = session.run("x = 2\nimport time\ntime.sleep(5)")

    assert result.status == "killed" and result.error is not None
    assert result.error.type == "OutOfMemory"
    assert "OOM-killed at 128Mi" in result.error.message
    assert "--memory" in result.error.message
    assert session.run("x").value == "1"


def test_oom_retry_doubles_the_memory(
    kube_session: Callable[..., Session], server: KubeServer
) -> None:
    session = kube_session(
        "retry", memory_limit="64Mi", retry_oom=True, memory_cap="256Mi"
    )
    server.inject("oom", job="retry-.*", after=0.2)

    result = session.run("import time\ntime.sleep(1)\nx = 1")

    assert result.status == "ok"
    # The OOM-killed Job was deleted; what is left is the retry, with twice
    # the memory.
    (job,) = [j for j in server.jobs() if j["metadata"]["name"].startswith("retry-")]
    assert job["metadata"]["name"].endswith("-r1")
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["memory"] == "128Mi"


def test_an_image_that_cannot_be_pulled(
    kube_session: Callable[..., Session], server: KubeServer
) -> None:
    session = kube_session("pull", image="registry.example/does-not-exist:1")
    with pytest.raises(ImagePullFailed, match="does-not-exist:1") as raised:
        session.run("x = 1")
    assert raised.value.image == "registry.example/does-not-exist:1"
    assert session.head == 0
    assert not [j for j in server.jobs() if j["metadata"]["name"].startswith("pull-")]


def test_an_unschedulable_pod(
    kube_session: Callable[..., Session], server: KubeServer
) -> None:
    session = kube_session("unsched", schedule_timeout=1.0)
    server.inject("unschedulable", job="unsched-.*")
    with pytest.raises(Unschedulable, match="Insufficient memory"):
        session.run("x = 1")
    assert session.head == 0


def test_an_evicted_pod(
    kube_session: Callable[..., Session], server: KubeServer
) -> None:
    session = kube_session("evicted")
    session.run("x = 1")
    server.inject("evict", job="evicted-.*", after=0.5)
    result = session.run("x = 2\nimport time\ntime.sleep(5)")
    assert result.status == "killed" and result.error is not None
    assert "evicted" in result.error.message
    assert session.run("x").value == "1"


def test_the_deadline_stops_the_step(kube_session: Callable[..., Session]) -> None:
    session = kube_session("deadline")
    session.run("x = 1")
    result = session.run("x = 2\nimport time\ntime.sleep(30)", timeout=1)
    assert result.status == "timeout"
    assert session.run("x").value == "1"


def test_a_container_that_exits_before_committing(
    kube_session: Callable[..., Session],
) -> None:
    session = kube_session("crash")
    session.run("x = 1")
    result = session.run("x = 2\nimport os\nos._exit(5)")
    assert result.status == "error" and result.error is not None
    assert result.error.type == "StepCrashed"
    assert "exited with code 5" in result.error.message
    assert session.run("x").value == "1"


def test_cancel_deletes_the_job_and_its_pod(
    kube_session: Callable[..., Session], server: KubeServer
) -> None:
    session = kube_session("cancel")
    session.run("x = 1")
    results = []
    thread = threading.Thread(
        target=lambda: results.append(session.run("x = 2\nimport time\ntime.sleep(30)"))
    )
    thread.start()
    deadline = time.monotonic() + 20
    backend = session.backend
    while not backend.cancel("cancel") and time.monotonic() < deadline:
        time.sleep(0.1)
    thread.join(timeout=30)

    assert results and results[0].status == "killed"
    assert results[0].error is not None and results[0].error.type == "Cancelled"
    assert session.run("x").value == "1"
    deadline = time.monotonic() + 10
    while server.pod_processes and time.monotonic() < deadline:
        time.sleep(0.1)
    assert server.pod_processes == 0


def test_the_pod_watch_resumes_after_it_ends(
    kube_session: Callable[..., Session],
    server: KubeServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(kube, "_WATCH_SECONDS", 1)
    session = kube_session("resume")
    compactor = threading.Timer(1.5, server.compact)
    compactor.start()
    result = session.run("import time\ntime.sleep(3)\nx = 1")
    compactor.join()
    assert result.status == "ok"


def test_job_names_are_unique_per_attempt_and_valid() -> None:
    first = kube.job_name("a" * 63, 12345, "20261203t101010101-aaaaaaaa")
    again = kube.job_name("a" * 63, 12345, "20261203t101010101-bbbbbbbb")
    assert len(first) <= 63 and first != again
    assert kube.job_name("s", 1, "x-12345678", retry=2) == "s-s1-12345678-r2"


def test_options_default_to_a_hardened_step() -> None:
    options = KubernetesOptions()
    assert options.mount_service_account_token is False
    assert options.retry_oom is False
