"""The test API server, exercised only through the official Kubernetes client."""

from __future__ import annotations

import json
import os
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import kubernetes
import pytest
from kubernetes import client, watch
from kubernetes.client.exceptions import ApiException
from kubeserver import FAULT_ANNOTATION, KubeServer

HELLO = "print('hello', flush=True); import time; time.sleep(0.5); print('bye')"


@pytest.fixture(scope="module")
def server() -> Iterator[KubeServer]:
    with KubeServer() as kube:
        yield kube
    assert kube.pod_processes == 0


@pytest.fixture(scope="module")
def api(
    server: KubeServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[client.ApiClient]:
    path = server.write_kubeconfig(tmp_path_factory.mktemp("kube") / "config")
    configuration = client.Configuration()
    kubernetes.config.load_kube_config(
        config_file=str(path), context="test", client_configuration=configuration
    )
    with client.ApiClient(configuration) as api_client:
        yield api_client


@pytest.fixture
def batch(api: client.ApiClient) -> client.BatchV1Api:
    return client.BatchV1Api(api)


@pytest.fixture
def core(api: client.ApiClient) -> client.CoreV1Api:
    return client.CoreV1Api(api)


@pytest.fixture
def namespace() -> str:
    return f"t-{uuid.uuid4().hex[:8]}"


def job_manifest(
    name: str,
    code: str,
    image: str = "python:3.11-slim",
    annotations: dict[str, str] | None = None,
    **spec: Any,
) -> client.V1Job:
    container = client.V1Container(
        name="step", image=image, command=["python", "-c", code]
    )
    template = client.V1PodTemplateSpec(
        metadata=client.V1ObjectMeta(labels={"app": "jobrunner"}),
        spec=client.V1PodSpec(containers=[container], restart_policy="Never"),
    )
    spec.setdefault("backoff_limit", 0)
    return client.V1Job(
        metadata=client.V1ObjectMeta(name=name, annotations=annotations),
        spec=client.V1JobSpec(template=template, **spec),
    )


def wait_for(
    list_function: Callable[..., Any],
    namespace: str,
    name: str,
    done: Callable[[Any], bool],
    timeout: int = 20,
) -> Any:
    """Watch one object until ``done`` holds for it; return it."""
    stream = watch.Watch().stream(
        list_function,
        namespace,
        field_selector=f"metadata.name={name}",
        timeout_seconds=timeout,
    )
    for event in stream:
        if event["type"] != "DELETED" and done(event["object"]):
            return event["object"]
    raise AssertionError(f"{name} never reached the expected state")


def finished(job: client.V1Job) -> bool:
    conditions = job.status.conditions or [] if job.status else []
    return any(
        c.type in ("Complete", "Failed") and c.status == "True" for c in conditions
    )


def condition(job: client.V1Job, kind: str) -> client.V1JobCondition:
    return next(c for c in job.status.conditions if c.type == kind)


def only_pod(core: client.CoreV1Api, namespace: str, job: str) -> client.V1Pod:
    pods = core.list_namespaced_pod(namespace, label_selector=f"job-name={job}").items
    assert len(pods) == 1
    return pods[0]


def wait_for_pod(
    core: client.CoreV1Api,
    namespace: str,
    job: str,
    done: Callable[[client.V1Pod], bool],
) -> client.V1Pod:
    stream = watch.Watch().stream(
        core.list_namespaced_pod,
        namespace,
        label_selector=f"batch.kubernetes.io/job-name={job}",
        timeout_seconds=20,
    )
    for event in stream:
        if done(event["object"]):
            return event["object"]
    raise AssertionError(f"no pod of {job} reached the expected state")


def wait_for_deletion(
    list_function: Callable[..., Any], namespace: str, obj: Any
) -> Any:
    """Watch from ``obj``'s version until it is deleted; return its last state."""
    stream = watch.Watch().stream(
        list_function,
        namespace,
        field_selector=f"metadata.name={obj.metadata.name}",
        resource_version=obj.metadata.resource_version,
        timeout_seconds=10,
    )
    for event in stream:
        if event["type"] == "DELETED":
            return event["object"]
    raise AssertionError(f"{obj.metadata.name} was never deleted")


def wait_for_pod_deletion(
    core: client.CoreV1Api, namespace: str, pod: client.V1Pod
) -> client.V1Pod:
    return wait_for_deletion(core.list_namespaced_pod, namespace, pod)


def first_line(core: client.CoreV1Api, namespace: str, pod: client.V1Pod) -> str:
    stream = watch.Watch().stream(
        core.read_namespaced_pod_log, pod.metadata.name, namespace, follow=True
    )
    return str(next(iter(stream)))


def running(pod: client.V1Pod) -> bool:
    return bool(pod.status.phase == "Running")


def event_reasons(core: client.CoreV1Api, namespace: str, name: str) -> dict[str, str]:
    events = core.list_namespaced_event(
        namespace, field_selector=f"involvedObject.name={name}"
    ).items
    return {event.reason: event.message for event in events}


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_version_and_discovery(api: client.ApiClient) -> None:
    version = client.VersionApi(api).get_code()
    groups = client.ApisApi(api).get_api_versions()

    assert version.git_version.startswith("v1.")
    assert [group.name for group in groups.groups] == ["batch"]


def test_job_runs_and_its_log_streams_live(
    batch: client.BatchV1Api, core: client.CoreV1Api, namespace: str
) -> None:
    batch.create_namespaced_job(namespace, job_manifest("hello", HELLO))
    pod = wait_for_pod(core, namespace, "hello", running)

    arrivals = []
    for line in watch.Watch().stream(
        core.read_namespaced_pod_log,
        pod.metadata.name,
        namespace,
        container="step",
        follow=True,
    ):
        arrivals.append((line, time.monotonic()))
    job = wait_for(batch.list_namespaced_job, namespace, "hello", finished)

    assert [line for line, _ in arrivals] == ["hello", "bye"]
    assert arrivals[1][1] - arrivals[0][1] > 0.3, "the log was not streamed live"
    assert condition(job, "Complete").status == "True"
    assert job.status.succeeded == 1 and job.status.active is None
    assert job.status.completion_time is not None


def test_finished_pod_reports_completion(
    batch: client.BatchV1Api, core: client.CoreV1Api, namespace: str
) -> None:
    code = "import sys; print('out', flush=True); print('err', file=sys.stderr)"
    batch.create_namespaced_job(namespace, job_manifest("done", code))
    wait_for(batch.list_namespaced_job, namespace, "done", finished)

    pod = only_pod(core, namespace, "done")
    state = pod.status.container_statuses[0].state.terminated
    log = core.read_namespaced_pod_log(pod.metadata.name, namespace)

    assert pod.metadata.name.startswith("done-") and len(pod.metadata.name) == 10
    assert pod.metadata.labels["app"] == "jobrunner"
    assert pod.metadata.owner_references[0].kind == "Job"
    assert pod.status.phase == "Succeeded"
    assert (state.exit_code, state.reason) == (0, "Completed")
    # stdout and stderr are separate pipes: their relative order is not kept.
    assert sorted(log.splitlines()) == ["err", "out"]
    assert {"Scheduled", "Started"} <= set(
        event_reasons(core, namespace, pod.metadata.name)
    )
    assert {"SuccessfulCreate", "Completed"} <= set(
        event_reasons(core, namespace, "done")
    )


def test_pod_gets_env_secrets_and_this_interpreter(
    batch: client.BatchV1Api, core: client.CoreV1Api, namespace: str
) -> None:
    secret = client.V1Secret(
        metadata=client.V1ObjectMeta(name="creds"), string_data={"KEY": "s3cret"}
    )
    core.create_namespaced_secret(namespace, secret)
    code = (
        "import os, sys; print(sys.executable); print(os.environ['PLAIN']); "
        "print(os.environ['FROM_KEY']); print(os.environ['S_KEY']); "
        "print(os.getcwd()); import kubeserver; print(os.environ['HOSTNAME'])"
    )
    manifest = job_manifest("env", code)
    manifest.spec.template.spec.containers[0].env = [
        client.V1EnvVar(name="PLAIN", value="plain-$(MISSING)"),
        client.V1EnvVar(
            name="FROM_KEY",
            value_from=client.V1EnvVarSource(
                secret_key_ref=client.V1SecretKeySelector(name="creds", key="KEY")
            ),
        ),
    ]
    manifest.spec.template.spec.containers[0].env_from = [
        client.V1EnvFromSource(
            prefix="S_", secret_ref=client.V1SecretEnvSource(name="creds")
        )
    ]
    batch.create_namespaced_job(namespace, manifest)
    wait_for(batch.list_namespaced_job, namespace, "env", finished)

    pod = only_pod(core, namespace, "env")
    lines = core.read_namespaced_pod_log(pod.metadata.name, namespace).splitlines()

    assert lines[:4] == [sys.executable, "plain-$(MISSING)", "s3cret", "s3cret"]
    assert pod.metadata.name in lines[4] and lines[4] != os.getcwd()
    assert lines[5] == pod.metadata.name


def test_missing_secret_blocks_the_container(
    batch: client.BatchV1Api, core: client.CoreV1Api, namespace: str
) -> None:
    manifest = job_manifest("nosecret", "print(1)")
    manifest.spec.template.spec.containers[0].env = [
        client.V1EnvVar(
            name="X",
            value_from=client.V1EnvVarSource(
                secret_key_ref=client.V1SecretKeySelector(name="absent", key="k")
            ),
        )
    ]
    batch.create_namespaced_job(namespace, manifest)

    def config_error(pod: client.V1Pod) -> bool:
        statuses = pod.status.container_statuses or []
        return (
            bool(statuses)
            and statuses[0].state.waiting is not None
            and (statuses[0].state.waiting.reason == "CreateContainerConfigError")
        )

    pod = wait_for_pod(core, namespace, "nosecret", config_error)

    assert (
        pod.status.container_statuses[0].state.waiting.message
        == 'secret "absent" not found'
    )
    assert pod.status.phase == "Pending"
    batch.delete_namespaced_job("nosecret", namespace, propagation_policy="Background")


def test_oom_fault_from_annotation(
    batch: client.BatchV1Api, core: client.CoreV1Api, namespace: str
) -> None:
    manifest = job_manifest(
        "oom", "import time; time.sleep(30)", annotations={FAULT_ANNOTATION: "oom"}
    )
    batch.create_namespaced_job(namespace, manifest)
    job = wait_for(batch.list_namespaced_job, namespace, "oom", finished)

    pod = only_pod(core, namespace, "oom")
    state = pod.status.container_statuses[0].state.terminated

    assert (state.exit_code, state.reason) == (137, "OOMKilled")
    assert pod.status.phase == "Failed"
    assert condition(job, "Failed").reason == "BackoffLimitExceeded"
    assert job.status.failed == 1


def test_injected_eviction(
    server: KubeServer, batch: client.BatchV1Api, core: client.CoreV1Api, namespace: str
) -> None:
    server.inject("evict", job="evicted", namespace=namespace, after=0.1)
    batch.create_namespaced_job(
        namespace, job_manifest("evicted", "import time; time.sleep(30)")
    )
    job = wait_for(batch.list_namespaced_job, namespace, "evicted", finished)

    pod = only_pod(core, namespace, "evicted")

    assert pod.status.phase == "Failed"
    assert pod.status.reason == "Evicted"
    assert pod.status.message.startswith("The node was low on resource: memory.")
    assert "Evicted" in event_reasons(core, namespace, pod.metadata.name)
    assert condition(job, "Failed").reason == "BackoffLimitExceeded"


def test_injection_is_used_up(
    server: KubeServer, batch: client.BatchV1Api, namespace: str
) -> None:
    server.inject("oom", job="retried", namespace=namespace, times=1)
    batch.create_namespaced_job(
        namespace,
        job_manifest("retried", "import time; time.sleep(0.3)", backoff_limit=1),
    )
    job = wait_for(batch.list_namespaced_job, namespace, "retried", finished)

    assert condition(job, "Complete").status == "True"
    assert (job.status.failed, job.status.succeeded) == (1, 1)


def test_missing_image_cannot_be_pulled(
    batch: client.BatchV1Api, core: client.CoreV1Api, namespace: str
) -> None:
    image = "registry.example/does-not-exist:1"
    batch.create_namespaced_job(
        namespace, job_manifest("pull", "print(1)", image=image)
    )

    def backing_off(pod: client.V1Pod) -> bool:
        statuses = pod.status.container_statuses or []
        waiting = statuses[0].state.waiting if statuses else None
        return waiting is not None and waiting.reason == "ImagePullBackOff"

    pod = wait_for_pod(core, namespace, "pull", backing_off)
    events = core.list_namespaced_event(
        namespace,
        field_selector=f"involvedObject.name={pod.metadata.name},type=Warning",
    ).items

    assert pod.status.phase == "Pending"
    assert image in pod.status.container_statuses[0].state.waiting.message
    assert any(e.reason == "Failed" and image in e.message for e in events)
    assert {e.message for e in events} >= {
        "Error: ErrImagePull",
        "Error: ImagePullBackOff",
    }
    batch.delete_namespaced_job("pull", namespace, propagation_policy="Background")


def test_unschedulable_pod_stays_pending(
    server: KubeServer, batch: client.BatchV1Api, core: client.CoreV1Api, namespace: str
) -> None:
    server.inject("unschedulable", namespace=namespace)
    batch.create_namespaced_job(namespace, job_manifest("big", "print(1)"))

    def unschedulable(pod: client.V1Pod) -> bool:
        return any(c.reason == "Unschedulable" for c in pod.status.conditions or [])

    pod = wait_for_pod(core, namespace, "big", unschedulable)
    scheduled = next(c for c in pod.status.conditions if c.type == "PodScheduled")
    reasons = event_reasons(core, namespace, pod.metadata.name)

    assert pod.status.phase == "Pending" and scheduled.status == "False"
    assert (
        "0/1 nodes are available: 1 Insufficient memory." in reasons["FailedScheduling"]
    )
    assert batch.read_namespaced_job("big", namespace).status.active == 1
    with pytest.raises(ApiException) as raised:
        core.read_namespaced_pod_log(pod.metadata.name, namespace)
    assert raised.value.status == 400
    batch.delete_namespaced_job("big", namespace, propagation_policy="Background")


def test_active_deadline_kills_the_pod(
    batch: client.BatchV1Api, core: client.CoreV1Api, namespace: str
) -> None:
    code = "import os, time; print(os.getpid(), flush=True); time.sleep(30)"
    batch.create_namespaced_job(
        namespace, job_manifest("slow", code, active_deadline_seconds=1)
    )
    job = wait_for(batch.list_namespaced_job, namespace, "slow", finished)

    pod = only_pod(core, namespace, "slow")
    pid = int(core.read_namespaced_pod_log(pod.metadata.name, namespace))

    assert condition(job, "Failed").reason == "DeadlineExceeded"
    assert pod.status.phase == "Failed" and pod.status.reason == "DeadlineExceeded"
    assert not process_alive(pid)


def test_background_delete_kills_the_process(
    batch: client.BatchV1Api, core: client.CoreV1Api, namespace: str
) -> None:
    code = "import os, time; print(os.getpid(), flush=True); time.sleep(30)"
    batch.create_namespaced_job(namespace, job_manifest("victim", code))
    pod = wait_for_pod(core, namespace, "victim", running)
    pid = int(first_line(core, namespace, pod))

    status = batch.delete_namespaced_job(
        "victim", namespace, propagation_policy="Background"
    )
    gone = wait_for_pod_deletion(core, namespace, pod)

    assert status["status"] == "Success"
    assert gone.metadata.deletion_timestamp is not None
    assert not process_alive(pid)
    assert core.list_namespaced_pod(namespace).items == []


def test_default_delete_orphans_the_pods(
    batch: client.BatchV1Api, core: client.CoreV1Api, namespace: str
) -> None:
    code = "import os, time; print(os.getpid(), flush=True); time.sleep(30)"
    batch.create_namespaced_job(namespace, job_manifest("orphaning", code))
    pod = wait_for_pod(core, namespace, "orphaning", running)
    pid = int(first_line(core, namespace, pod))

    batch.delete_namespaced_job("orphaning", namespace)
    orphan = core.read_namespaced_pod(pod.metadata.name, namespace)
    alive_after_job_delete = process_alive(pid)
    deleting = core.delete_namespaced_pod(pod.metadata.name, namespace)
    wait_for_pod_deletion(core, namespace, orphan)

    assert alive_after_job_delete
    assert orphan.metadata.owner_references is None
    assert deleting.metadata.deletion_timestamp is not None
    assert not process_alive(pid)


def test_deleted_pod_is_replaced_within_the_backoff_limit(
    batch: client.BatchV1Api, core: client.CoreV1Api, namespace: str
) -> None:
    code = "import time; time.sleep(30)"
    batch.create_namespaced_job(
        namespace, job_manifest("replaced", code, backoff_limit=1)
    )
    first = wait_for_pod(core, namespace, "replaced", running)

    core.delete_namespaced_pod(first.metadata.name, namespace, grace_period_seconds=0)
    second = wait_for_pod(
        core, namespace, "replaced", lambda p: p.metadata.name != first.metadata.name
    )
    job = batch.read_namespaced_job("replaced", namespace)

    assert second.metadata.labels["controller-uid"] == job.metadata.uid
    assert job.status.failed == 1
    deleting = batch.delete_namespaced_job(
        "replaced", namespace, propagation_policy="Foreground"
    )
    wait_for_pod_deletion(core, namespace, second)
    wait_for_deletion(batch.list_namespaced_job, namespace, job)

    assert deleting["metadata"]["finalizers"] == ["foregroundDeletion"]
    assert batch.list_namespaced_job(namespace).items == []


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda job: setattr(job.metadata, "name", "Bad_Name"), "metadata.name"),
        (lambda job: setattr(job.metadata, "name", "x" * 64), "metadata.name"),
        (lambda job: setattr(job.metadata, "name", "-leading"), "metadata.name"),
        (
            lambda job: setattr(job.metadata, "labels", {"k": "v" * 64}),
            "metadata.labels",
        ),
        (
            lambda job: setattr(job.metadata, "labels", {"bad key!": "v"}),
            "metadata.labels",
        ),
        (
            lambda job: setattr(job.spec.template.spec.containers[0], "image", ""),
            "spec.template.spec.containers[0].image",
        ),
        (
            lambda job: setattr(job.spec.template.spec, "restart_policy", None),
            "spec.template.spec.restartPolicy",
        ),
        (
            lambda job: setattr(job.spec.template.spec, "containers", []),
            "spec.template.spec.containers",
        ),
        (
            lambda job: setattr(job.spec, "active_deadline_seconds", 0),
            "spec.activeDeadlineSeconds",
        ),
    ],
)
def test_invalid_jobs_are_rejected(
    batch: client.BatchV1Api,
    namespace: str,
    change: Callable[[client.V1Job], None],
    field: str,
) -> None:
    manifest = job_manifest("valid-name", "print(1)")
    change(manifest)

    with pytest.raises(ApiException) as raised:
        batch.create_namespaced_job(namespace, manifest)

    assert raised.value.status == 422
    body = json.loads(raised.value.body)
    assert body["kind"] == "Status" and body["reason"] == "Invalid"
    assert field in [cause["field"] for cause in body["details"]["causes"]]
    assert batch.list_namespaced_job(namespace).items == []


def test_duplicate_name_conflicts_and_missing_is_not_found(
    batch: client.BatchV1Api, core: client.CoreV1Api, namespace: str
) -> None:
    secret = client.V1Secret(metadata=client.V1ObjectMeta(name="once"), data={})
    core.create_namespaced_secret(namespace, secret)

    with pytest.raises(ApiException) as duplicate:
        core.create_namespaced_secret(namespace, secret)
    with pytest.raises(ApiException) as missing:
        batch.read_namespaced_job("nothing", namespace)
    with pytest.raises(ApiException) as unknown:
        client.AppsV1Api(batch.api_client).list_namespaced_deployment(namespace)

    assert duplicate.value.status == 409
    assert json.loads(duplicate.value.body)["reason"] == "AlreadyExists"
    assert missing.value.status == 404
    assert json.loads(missing.value.body)["message"] == 'jobs.batch "nothing" not found'
    assert unknown.value.status == 404
    assert json.loads(unknown.value.body)["kind"] == "Status"


def test_generate_name_and_selectors(batch: client.BatchV1Api, namespace: str) -> None:
    manifest = job_manifest("ignored", "print(1)")
    manifest.metadata = client.V1ObjectMeta(generate_name="gen-", labels={"tier": "a"})
    created = batch.create_namespaced_job(namespace, manifest)
    other = job_manifest("other", "print(1)")
    other.metadata.labels = {"tier": "b"}
    batch.create_namespaced_job(namespace, other)

    def names(selector: str) -> list[str]:
        jobs = batch.list_namespaced_job(namespace, label_selector=selector).items
        return [job.metadata.name for job in jobs]

    assert created.metadata.name.startswith("gen-") and len(created.metadata.name) == 9
    assert created.spec.selector.match_labels == {
        "batch.kubernetes.io/controller-uid": created.metadata.uid
    }
    assert names("tier=a") == [created.metadata.name]
    assert names("tier in (a,b),tier!=b") == [created.metadata.name]
    assert names("!tier") == []
    with pytest.raises(ApiException) as bad_selector:
        batch.list_namespaced_job(namespace, label_selector="tier in a")
    with pytest.raises(ApiException) as bad_field:
        batch.list_namespaced_job(namespace, field_selector="spec.parallelism=1")
    assert (bad_selector.value.status, bad_field.value.status) == (400, 400)


def test_watch_resumes_after_a_resource_version(
    core: client.CoreV1Api, namespace: str
) -> None:
    first = core.create_namespaced_secret(
        namespace, client.V1Secret(metadata=client.V1ObjectMeta(name="first"))
    )
    for name in ("second", "third"):
        core.create_namespaced_secret(
            namespace, client.V1Secret(metadata=client.V1ObjectMeta(name=name))
        )
    core.delete_namespaced_secret("second", namespace)

    started = time.monotonic()
    events = [
        (event["type"], event["object"].metadata.name)
        for event in watch.Watch().stream(
            core.list_namespaced_secret,
            namespace,
            resource_version=first.metadata.resource_version,
            timeout_seconds=1,
        )
    ]

    assert events == [("ADDED", "second"), ("ADDED", "third"), ("DELETED", "second")]
    assert 0.9 < time.monotonic() - started < 5, "timeoutSeconds was not honoured"


@pytest.mark.timeout(10)
def test_expired_resource_version_is_gone(
    server: KubeServer, core: client.CoreV1Api, namespace: str
) -> None:
    first = core.create_namespaced_secret(
        namespace, client.V1Secret(metadata=client.V1ObjectMeta(name="old"))
    )
    core.create_namespaced_secret(
        namespace, client.V1Secret(metadata=client.V1ObjectMeta(name="new"))
    )
    server.compact()

    with pytest.raises(ApiException) as raised:
        for _ in watch.Watch().stream(
            core.list_namespaced_secret,
            namespace,
            resource_version=first.metadata.resource_version,
        ):
            pass

    assert raised.value.status == 410


def test_cronjobs_are_stored_strictly(batch: client.BatchV1Api, namespace: str) -> None:
    template = job_manifest("unused", "print(1)").spec.template

    def cronjob(name: str, schedule: str) -> client.V1CronJob:
        job_template = client.V1JobTemplateSpec(
            spec=client.V1JobSpec(template=template)
        )
        spec = client.V1CronJobSpec(schedule=schedule, job_template=job_template)
        return client.V1CronJob(metadata=client.V1ObjectMeta(name=name), spec=spec)

    created = batch.create_namespaced_cron_job(
        namespace, cronjob("nightly", "0 3 * * *")
    )
    bad = [cronjob("bad-schedule", "61 * * * *"), cronjob("x" * 53, "@daily")]
    codes = []
    for manifest in bad:
        with pytest.raises(ApiException) as raised:
            batch.create_namespaced_cron_job(namespace, manifest)
        codes.append(raised.value.status)
    listed = batch.list_namespaced_cron_job(namespace).items
    batch.delete_namespaced_cron_job("nightly", namespace)

    assert created.spec.concurrency_policy == "Allow"
    assert [cron.metadata.name for cron in listed] == ["nightly"]
    assert codes == [422, 422]
    assert batch.list_namespaced_cron_job(namespace).items == []


def test_suspended_job_starts_when_patched(
    batch: client.BatchV1Api, namespace: str
) -> None:
    batch.create_namespaced_job(
        namespace, job_manifest("later", "print(1)", suspend=True)
    )
    suspended = wait_for(
        batch.list_namespaced_job,
        namespace,
        "later",
        lambda job: bool(job.status and job.status.conditions),
    )

    batch.patch_namespaced_job("later", namespace, {"spec": {"suspend": False}})
    job = wait_for(batch.list_namespaced_job, namespace, "later", finished)

    assert condition(suspended, "Suspended").status == "True"
    assert condition(job, "Complete").status == "True"


def test_requests_are_counted(
    server: KubeServer, batch: client.BatchV1Api, namespace: str
) -> None:
    server.reset_requests()

    batch.list_namespaced_job(namespace)
    with pytest.raises(ApiException):
        batch.read_namespaced_job("absent", namespace)

    assert server.requests == [
        ("GET", f"/apis/batch/v1/namespaces/{namespace}/jobs"),
        ("GET", f"/apis/batch/v1/namespaces/{namespace}/jobs/absent"),
    ]


def test_requests_without_the_token_are_unauthorized(
    server: KubeServer, namespace: str
) -> None:
    configuration = client.Configuration(host=server.url)
    with (
        client.ApiClient(configuration) as anonymous,
        pytest.raises(ApiException) as raised,
    ):
        client.CoreV1Api(anonymous).list_namespaced_pod(namespace)

    assert raised.value.status == 401


def test_failing_step_reports_its_exit_code(
    batch: client.BatchV1Api, core: client.CoreV1Api, namespace: str
) -> None:
    batch.create_namespaced_job(namespace, job_manifest("fails", "raise SystemExit(3)"))
    job = wait_for(batch.list_namespaced_job, namespace, "fails", finished)

    state = only_pod(core, namespace, "fails").status.container_statuses[0].state

    assert (state.terminated.exit_code, state.terminated.reason) == (3, "Error")
    assert condition(job, "Failed").reason == "BackoffLimitExceeded"
    assert job.status.failed == 1 and job.status.succeeded is None


def test_on_failure_restarts_the_container_in_its_pod(
    batch: client.BatchV1Api, core: client.CoreV1Api, namespace: str
) -> None:
    # The pod's folder survives a restart, so the second run finds the marker.
    code = (
        "import os, sys; first = not os.path.exists('ran'); "
        "open('ran', 'w').close(); sys.exit(4 if first else 0)"
    )
    manifest = job_manifest("flaky", code, backoff_limit=1)
    manifest.spec.template.spec.restart_policy = "OnFailure"
    batch.create_namespaced_job(namespace, manifest)
    job = wait_for(batch.list_namespaced_job, namespace, "flaky", finished)

    status = only_pod(core, namespace, "flaky").status.container_statuses[0]

    assert condition(job, "Complete").status == "True"
    assert status.restart_count == 1
    assert status.last_state.terminated.exit_code == 4


def test_finished_job_expires_after_its_ttl(
    batch: client.BatchV1Api, core: client.CoreV1Api, namespace: str
) -> None:
    manifest = job_manifest("brief", "print(1)", ttl_seconds_after_finished=0)
    created = batch.create_namespaced_job(namespace, manifest)

    wait_for_deletion(batch.list_namespaced_job, namespace, created)

    assert (
        core.list_namespaced_pod(namespace, label_selector="job-name=brief").items == []
    )


def test_unknown_fault_annotation_is_rejected(
    batch: client.BatchV1Api, namespace: str
) -> None:
    manifest = job_manifest("odd", "print(1)", annotations={FAULT_ANNOTATION: "fire"})

    with pytest.raises(ApiException) as raised:
        batch.create_namespaced_job(namespace, manifest)

    assert raised.value.status == 422
