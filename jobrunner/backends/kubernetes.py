"""The Kubernetes backend: every step runs as its own batch/v1 Job.

No pod lives between steps and nothing is ever exec'd into: the Job's container
runs ``python -m jobrunner.runtime`` with the same arguments as a local step,
and the session continues through the checkpoint store, which every pod must
reach (S3 in a real cluster).

Per successful step the backend makes at most five API requests: create a
Secret for the step's secrets (only when there are any), create the Job, watch
its pod, follow the pod's log, delete the Secret. Failures add a few reads (the
Job, the pod's events) to say what went wrong.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

from kubernetes import client, config, watch
from kubernetes.client.exceptions import ApiException
from urllib3.exceptions import HTTPError

from jobrunner.backends._quantity import memory_bytes
from jobrunner.backends.base import (
    RUNTIME_MODULE,
    Backend,
    OutputCallback,
    StepExit,
    StepLaunch,
)
from jobrunner.errors import (
    BackendError,
    ClusterUnavailable,
    ImagePullFailed,
    Unschedulable,
)

__all__ = ["KubernetesBackend", "KubernetesOptions"]

logger = logging.getLogger(__name__)

MANAGED_BY = "jobrunner"
LABEL_PREFIX = "jobrunner.io"
CONTAINER = "step"
SCRATCH = "/tmp"
STEP_UID = 10001
_IMAGE_PULL_FAILURES = {
    "ErrImagePull",
    "ImagePullBackOff",
    "InvalidImageName",
    "ErrImageNeverPull",
}
_WATCH_SECONDS = 60
_KILLED_EXIT = 128 + 9


@dataclass(frozen=True)
class KubernetesOptions:
    """What every step's Job is made of.

    Attributes:
        namespace: The namespace the Jobs run in.
        image: The step image (see ``Dockerfile.step``).
        image_pull_policy: ``IfNotPresent``, ``Always`` or ``Never``.
        image_pull_secrets: Names of Secrets for pulling the image.
        cpu_request, cpu_limit: CPU quantities such as ``"500m"``.
        memory_request, memory_limit: Memory quantities such as ``"512Mi"``.
        gpus: Number of ``nvidia.com/gpu`` to request.
        node_selector: Labels a node must have.
        tolerations: Tolerations, as Kubernetes dicts.
        service_account: The pod's ServiceAccount.
        mount_service_account_token: Mount the ServiceAccount's token (off by
            default: a step has no business talking to the API server).
        env: Extra environment variables (not secrets: they are in the spec).
        env_secret: A Secret whose keys all become environment variables
            (store credentials, a signing key).
        labels, annotations: Added to the Job and its pod.
        ttl_seconds_after_finished: How long a finished Job is kept.
        store_claim: A PersistentVolumeClaim mounted at the store's path, when
            the store is a folder rather than a bucket.
        schedule_timeout: Seconds a pod may stay unschedulable before the step
            fails with the scheduler's reason.
        retry_oom: Run an OOM-killed step again with twice the memory, up to
            ``memory_cap``; safe, because a killed step committed nothing.
        memory_cap: The most memory an OOM retry may ask for.
    """

    namespace: str = "default"
    image: str = "jobrunner-step:latest"
    image_pull_policy: str = "IfNotPresent"
    image_pull_secrets: tuple[str, ...] = ()
    cpu_request: str | None = None
    cpu_limit: str | None = None
    memory_request: str | None = None
    memory_limit: str | None = None
    gpus: int = 0
    node_selector: dict[str, str] = field(default_factory=dict)
    tolerations: tuple[dict[str, Any], ...] = ()
    service_account: str | None = None
    mount_service_account_token: bool = False
    env: dict[str, str] = field(default_factory=dict)
    env_secret: str | None = None
    labels: dict[str, str] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)
    ttl_seconds_after_finished: int = 600
    store_claim: str | None = None
    schedule_timeout: float = 120.0
    retry_oom: bool = False
    memory_cap: str = "16Gi"


# Building the Job, one part at a time.


def job_name(session: str, step: int, attempt: str, retry: int = 0) -> str:
    """Return a Job name unique per attempt: session, step, attempt's suffix."""
    suffix = f"-s{step}-{attempt[-8:]}" + (f"-r{retry}" if retry else "")
    return f"{session[: 63 - len(suffix)].rstrip('-')}{suffix}"


def _labels(options: KubernetesOptions, launch: StepLaunch) -> dict[str, str]:
    return {
        **options.labels,
        "app.kubernetes.io/managed-by": MANAGED_BY,
        f"{LABEL_PREFIX}/session": launch.session,
        f"{LABEL_PREFIX}/step": str(launch.step),
        f"{LABEL_PREFIX}/attempt": launch.attempt[-8:],
    }


def _resources(options: KubernetesOptions) -> client.V1ResourceRequirements:
    requests = {"cpu": options.cpu_request, "memory": options.memory_request}
    limits: dict[str, Any] = {"cpu": options.cpu_limit, "memory": options.memory_limit}
    if options.gpus:
        limits["nvidia.com/gpu"] = str(options.gpus)
    return client.V1ResourceRequirements(
        requests={key: value for key, value in requests.items() if value} or None,
        limits={key: value for key, value in limits.items() if value} or None,
    )


def container_security_context() -> client.V1SecurityContext:
    """Return the hardened security context of a jobrunner container.

    No privilege escalation, a read-only root filesystem (write under the
    scratch volume), not root, and no Linux capabilities.
    """
    return client.V1SecurityContext(
        allow_privilege_escalation=False,
        read_only_root_filesystem=True,
        run_as_non_root=True,
        capabilities=client.V1Capabilities(drop=["ALL"]),
    )


def pod_security_context() -> client.V1PodSecurityContext:
    """Return the hardened security context of a jobrunner pod.

    Runs as an unprivileged user and group, under the runtime's default
    seccomp profile.
    """
    return client.V1PodSecurityContext(
        run_as_non_root=True,
        run_as_user=STEP_UID,
        run_as_group=STEP_UID,
        fs_group=STEP_UID,
        seccomp_profile=client.V1SeccompProfile(type="RuntimeDefault"),
    )


def _environment(
    options: KubernetesOptions, secret: str | None, keys: list[str]
) -> tuple[list[client.V1EnvVar], list[client.V1EnvFromSource]]:
    plain = [client.V1EnvVar(name=k, value=v) for k, v in sorted(options.env.items())]
    plain.append(client.V1EnvVar(name="HOME", value=SCRATCH))
    secret_refs = [
        client.V1EnvVar(
            name=key,
            value_from=client.V1EnvVarSource(
                secret_key_ref=client.V1SecretKeySelector(name=secret, key=key)
            ),
        )
        for key in keys
    ]
    from_secret = []
    if options.env_secret:
        from_secret.append(
            client.V1EnvFromSource(
                secret_ref=client.V1SecretEnvSource(name=options.env_secret)
            )
        )
    return plain + secret_refs, from_secret


def pod_volumes(
    options: KubernetesOptions, store_path: str | None
) -> tuple[list[client.V1Volume], list[client.V1VolumeMount]]:
    """Return a pod's volumes and its container's mounts.

    A scratch ``emptyDir`` at ``/tmp`` (the root filesystem is read-only), and
    the store's claim at ``store_path`` when the options name one.
    """
    volumes = [
        client.V1Volume(name="scratch", empty_dir=client.V1EmptyDirVolumeSource())
    ]
    mounts = [client.V1VolumeMount(name="scratch", mount_path=SCRATCH)]
    if options.store_claim and store_path:
        claim = client.V1PersistentVolumeClaimVolumeSource(
            claim_name=options.store_claim
        )
        volumes.append(client.V1Volume(name="store", persistent_volume_claim=claim))
        mounts.append(client.V1VolumeMount(name="store", mount_path=store_path))
    return volumes, mounts


def _container(
    options: KubernetesOptions,
    launch: StepLaunch,
    env: tuple[list[client.V1EnvVar], list[client.V1EnvFromSource]],
    mounts: list[client.V1VolumeMount],
) -> client.V1Container:
    return client.V1Container(
        name=CONTAINER,
        image=options.image,
        image_pull_policy=options.image_pull_policy,
        command=["python", "-m", RUNTIME_MODULE],
        args=list(launch.arguments),
        env=env[0],
        env_from=env[1] or None,
        resources=_resources(options),
        security_context=container_security_context(),
        volume_mounts=mounts,
        working_dir=SCRATCH,
    )


def _store_path(arguments: list[str]) -> str | None:
    url = arguments[arguments.index("--store") + 1] if "--store" in arguments else ""
    if "://" in url and not url.startswith("file://"):
        return None
    return url.removeprefix("file://") or None


def pod_spec(
    options: KubernetesOptions,
    container: client.V1Container,
    volumes: list[client.V1Volume],
) -> client.V1PodSpec:
    """Return a hardened pod spec that runs one container once.

    Args:
        options: Where and as whom the pod runs: its ServiceAccount (and
            whether its token is mounted), node selector, tolerations and
            image pull Secrets.
        container: The pod's only container.
        volumes: The pod's volumes (see :func:`pod_volumes`).
    """
    return client.V1PodSpec(
        containers=[container],
        restart_policy="Never",
        security_context=pod_security_context(),
        automount_service_account_token=options.mount_service_account_token,
        service_account_name=options.service_account,
        node_selector=options.node_selector or None,
        tolerations=[client.V1Toleration(**t) for t in options.tolerations] or None,
        image_pull_secrets=[
            client.V1LocalObjectReference(name=s) for s in options.image_pull_secrets
        ]
        or None,
        volumes=volumes,
    )


def build_job(
    options: KubernetesOptions,
    launch: StepLaunch,
    name: str,
    secret: str | None = None,
) -> client.V1Job:
    """Return the Job that runs one attempt of a step.

    Args:
        options: What every step's Job is made of.
        launch: The attempt to run.
        name: The Job's name (see :func:`job_name`).
        secret: The name of the Secret holding ``launch.environment``, if any.
    """
    labels = _labels(options, launch)
    env = _environment(options, secret, sorted(launch.environment))
    volumes, mounts = pod_volumes(options, _store_path(launch.arguments))
    pod = pod_spec(options, _container(options, launch, env, mounts), volumes)
    metadata = client.V1ObjectMeta(
        name=name, labels=labels, annotations=options.annotations or None
    )
    return client.V1Job(
        api_version="batch/v1",
        kind="Job",
        metadata=metadata,
        spec=client.V1JobSpec(
            backoff_limit=0,
            active_deadline_seconds=int(launch.timeout + 0.999)
            if launch.timeout
            else None,
            ttl_seconds_after_finished=options.ttl_seconds_after_finished,
            template=client.V1PodTemplateSpec(
                metadata=client.V1ObjectMeta(
                    labels=labels, annotations=options.annotations or None
                ),
                spec=pod,
            ),
        ),
    )


def build_secret(
    options: KubernetesOptions, launch: StepLaunch, name: str
) -> client.V1Secret:
    """Return the Secret that carries a step's secrets to its pod."""
    return client.V1Secret(
        api_version="v1",
        kind="Secret",
        metadata=client.V1ObjectMeta(name=name, labels=_labels(options, launch)),
        type="Opaque",
        string_data=dict(launch.environment),
    )


def _doubled(quantity: str) -> str:
    return f"{memory_bytes(quantity) * 2 // 2**20}Mi"


# Running it.


@dataclass
class _Outcome:
    """What the pod watch concluded."""

    exit: StepExit | None = None
    error: BackendError | None = None


class KubernetesBackend(Backend):
    """Runs each step as a Kubernetes Job.

    Args:
        options: What every step's Job is made of; keyword arguments override
            its fields (``KubernetesBackend(image="...", memory_limit="1Gi")``).
        kubeconfig: A kubeconfig file; defaults to ``$KUBECONFIG`` or
            ``~/.kube/config``, or the in-cluster ServiceAccount when jobrunner
            itself runs in a pod.
        context: The kubeconfig context to use.
        api_client: A ready ``kubernetes.client.ApiClient`` (then ``kubeconfig``
            and ``context`` are ignored).

    Raises:
        ClusterUnavailable: No cluster configuration could be loaded.
    """

    name = "kubernetes"

    def __init__(
        self,
        options: KubernetesOptions | None = None,
        *,
        kubeconfig: str | None = None,
        context: str | None = None,
        api_client: client.ApiClient | None = None,
        **overrides: Any,
    ) -> None:
        self.options = replace(options or KubernetesOptions(), **overrides)
        self.api = api_client or make_api_client(kubeconfig, context)
        self.batch = client.BatchV1Api(self.api)
        self.core = client.CoreV1Api(self.api)
        self._running: dict[str, tuple[str, str]] = {}
        self._cancelled: set[str] = set()
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        host = self.api.configuration.host
        return f"KubernetesBackend({host!r}, namespace={self.options.namespace!r})"

    def run(self, launch: StepLaunch, on_output: OutputCallback | None) -> StepExit:
        options = self.options
        for retry in range(32):
            ended = self._run_once(launch, on_output, options, retry)
            if ended.reason != "oom" or not self._can_retry(options):
                return ended
            assert options.memory_limit is not None
            doubled = _doubled(options.memory_limit)
            logger.info(
                "step of session %s was OOM-killed at %s; running it again with %s",
                launch.session,
                options.memory_limit,
                doubled,
            )
            options = replace(options, memory_limit=doubled, memory_request=doubled)
        return ended

    def _can_retry(self, options: KubernetesOptions) -> bool:
        if not options.retry_oom or not options.memory_limit:
            return False
        doubled = memory_bytes(options.memory_limit) * 2
        return doubled <= memory_bytes(options.memory_cap)

    def _run_once(
        self,
        launch: StepLaunch,
        on_output: OutputCallback | None,
        options: KubernetesOptions,
        retry: int,
    ) -> StepExit:
        name = job_name(launch.session, launch.step, launch.attempt, retry)
        secret = f"{name}-env" if launch.environment else None
        namespace = options.namespace
        if secret:
            self._call(
                self.core.create_namespaced_secret,
                namespace,
                build_secret(options, launch, secret),
            )
        try:
            self._call(
                self.batch.create_namespaced_job,
                namespace,
                build_job(options, launch, name, secret),
            )
            logger.info("created Job %s/%s", namespace, name)
            with self._lock:
                self._running[launch.attempt] = (launch.session, name)
            return self._follow(name, launch, on_output, options)
        except KeyboardInterrupt:
            self._delete_job(name, "the step was interrupted")
            raise
        finally:
            with self._lock:
                self._running.pop(launch.attempt, None)
                self._cancelled.discard(launch.attempt)
            if secret:
                self._delete_secret(secret)

    def _follow(
        self,
        name: str,
        launch: StepLaunch,
        on_output: OutputCallback | None,
        options: KubernetesOptions,
    ) -> StepExit:
        logs = _LogFollower(self.core, options.namespace, on_output)
        outcome = self._watch_pod(name, launch, options, logs)
        logs.join()
        with self._lock:
            cancelled = launch.attempt in self._cancelled
        if cancelled:
            return StepExit(
                reason="cancelled", message=f"the step's Job {name} was deleted"
            )
        if outcome.error is not None:
            self._delete_job(name, str(outcome.error))
            raise outcome.error
        assert outcome.exit is not None
        if outcome.exit.reason != "exited":
            self._delete_job(name, outcome.exit.message)
        return replace(outcome.exit, stderr_tail=logs.tail())

    def _watch_pod(
        self,
        name: str,
        launch: StepLaunch,
        options: KubernetesOptions,
        logs: _LogFollower,
    ) -> _Outcome:
        pods = _PodWatch(self.core, name, options.namespace)
        unschedulable_since: float | None = None
        try:
            for kind, pod in pods.events():
                if kind == "DELETED":
                    return self._deleted(name, launch, options)
                logs.start_if_running(pod)
                outcome = _outcome_of(pod, options, launch)
                if outcome is not None:
                    return outcome
                if not _unschedulable(pod):
                    unschedulable_since = pods.deadline = None
                    continue
                unschedulable_since = unschedulable_since or time.monotonic()
                pods.deadline = unschedulable_since + options.schedule_timeout
                if time.monotonic() >= pods.deadline:
                    return _Outcome(error=self._unschedulable(pod, launch, name))
        finally:
            pods.deadline = None
        raise AssertionError("the pod watch never ends by itself")

    def _deleted(
        self, name: str, launch: StepLaunch, options: KubernetesOptions
    ) -> _Outcome:
        with self._lock:
            if launch.attempt in self._cancelled:
                return _Outcome(exit=StepExit(reason="cancelled"))
        job = self._read_job(name, options.namespace)
        if job is not None and _job_condition(job, "Failed") == "DeadlineExceeded":
            return _Outcome(
                exit=StepExit(
                    reason="timeout",
                    message=f"the step's Job {name} exceeded its deadline of"
                    f" {launch.timeout}s",
                )
            )
        return _Outcome(
            exit=StepExit(
                reason="killed",
                message=f"the step's pod was deleted before the step finished (Job"
                f" {name}); run the step again",
            )
        )

    def _unschedulable(self, pod: Any, launch: StepLaunch, name: str) -> Unschedulable:
        reason = _scheduler_message(pod)
        try:
            events = self.core.list_namespaced_event(
                pod.metadata.namespace,
                field_selector=f"involvedObject.name={pod.metadata.name}",
            )
            messages = [
                e.message for e in events.items if e.reason == "FailedScheduling"
            ]
            reason = messages[-1] if messages else reason
        except (ApiException, HTTPError) as error:
            logger.debug(
                "could not read the events of %s: %r", pod.metadata.name, error
            )
        return Unschedulable(
            f"no node can run the step's pod: {reason}; lower the step's requests"
            " (--cpu, --memory, --gpus) or check the node selector and tolerations",
            session=launch.session,
            job=name,
        )

    def _read_job(self, name: str, namespace: str) -> Any:
        try:
            return self.batch.read_namespaced_job(name, namespace)
        except ApiException as error:
            if error.status == 404:
                return None
            raise cluster_error(error, f"read the Job {name}") from error

    def _delete_job(self, name: str, why: str) -> None:
        try:
            self.batch.delete_namespaced_job(
                name,
                self.options.namespace,
                body=client.V1DeleteOptions(propagation_policy="Background"),
            )
        except ApiException as error:
            if error.status != 404:
                logger.warning("could not delete the Job %s: %s", name, error.reason)
            return
        except HTTPError as error:
            logger.warning("could not delete the Job %s: %r", name, error)
            return
        logger.info("deleted the Job %s with its pods (%s)", name, why)

    def _delete_secret(self, name: str) -> None:
        with contextlib.suppress(ApiException, HTTPError):
            self.core.delete_namespaced_secret(name, self.options.namespace)

    def _call(self, method: Any, namespace: str, body: Any) -> Any:
        try:
            return method(namespace, body)
        except ApiException as error:
            kind = type(body).__name__.removeprefix("V1")
            raise cluster_error(error, f"create the step's {kind}") from error
        except HTTPError as error:
            raise ClusterUnavailable(
                f"cannot reach the Kubernetes API server at"
                f" {self.api.configuration.host}: {error}"
            ) from error

    def cancel(self, session: str | None = None) -> int:
        with self._lock:
            chosen = [
                (attempt, name)
                for attempt, (owner, name) in self._running.items()
                if session is None or owner == session
            ]
            self._cancelled.update(attempt for attempt, _ in chosen)
        for _, name in chosen:
            self._delete_job(name, "the step was cancelled")
        return len(chosen)


def make_api_client(kubeconfig: str | None, context: str | None) -> client.ApiClient:
    try:
        return config.new_client_from_config(config_file=kubeconfig, context=context)
    except config.ConfigException as error:
        if kubeconfig is None and context is None:
            with contextlib.suppress(config.ConfigException):
                config.load_incluster_config()
                return client.ApiClient()
        raise ClusterUnavailable(
            f"no Kubernetes cluster configured: {error}; set KUBECONFIG or pass"
            " --kubeconfig/--context"
        ) from error


def cluster_error(error: ApiException, action: str) -> BackendError:
    reason = error.reason or ""
    if error.status in (401, 403):
        return ClusterUnavailable(
            f"the Kubernetes API server refused to {action} ({error.status}"
            f" {reason}): check the credentials and the RBAC role"
        )
    return BackendError(f"could not {action}: {error.status} {reason} {_body(error)}")


def _body(error: ApiException) -> str:
    import json

    try:
        return str(json.loads(error.body or "{}").get("message", ""))
    except ValueError:
        return ""


def _job_condition(job: Any, kind: str) -> str | None:
    for condition in (job.status and job.status.conditions) or []:
        if condition.type == kind and condition.status == "True":
            return str(condition.reason or kind)
    return None


def _unschedulable(pod: Any) -> bool:
    for condition in (pod.status and pod.status.conditions) or []:
        if condition.type == "PodScheduled" and condition.status == "False":
            return bool(condition.reason == "Unschedulable")
    return False


def _scheduler_message(pod: Any) -> str:
    for condition in (pod.status and pod.status.conditions) or []:
        if condition.type == "PodScheduled":
            return str(condition.message or condition.reason)
    return "the scheduler found no node"


def _container_status(pod: Any) -> Any:
    statuses = (pod.status and pod.status.container_statuses) or []
    return next((s for s in statuses if s.name == CONTAINER), None)


def _outcome_of(
    pod: Any, options: KubernetesOptions, launch: StepLaunch
) -> _Outcome | None:
    """Return how the step ended, from its pod, or None while it runs."""
    status = _container_status(pod)
    waiting = status.state.waiting if status and status.state else None
    if waiting is not None and waiting.reason in _IMAGE_PULL_FAILURES:
        return _Outcome(
            error=ImagePullFailed(
                f"the cluster cannot pull the step image {options.image!r}"
                f" ({waiting.reason}: {waiting.message or 'no detail'}); build and"
                " push it, or load it into the cluster",
                session=launch.session,
                job=pod.metadata.labels.get("job-name", ""),
                image=options.image,
            )
        )
    phase = pod.status.phase if pod.status else None
    if phase not in ("Succeeded", "Failed"):
        return None
    if pod.status.reason == "Evicted":
        return _Outcome(
            exit=StepExit(
                reason="killed",
                message=f"the node evicted the step's pod: {pod.status.message}",
            )
        )
    if pod.status.reason == "DeadlineExceeded":
        return _Outcome(
            exit=StepExit(
                reason="timeout", message=f"the step ran longer than {launch.timeout}s"
            )
        )
    terminated = status.state.terminated if status and status.state else None
    if terminated is not None and terminated.reason == "OOMKilled":
        limit = options.memory_limit or "the node's memory"
        return _Outcome(
            exit=StepExit(
                reason="oom",
                exit_code=terminated.exit_code,
                message=f"the step's pod was OOM-killed at {limit}; raise --memory"
                " (or use --retry-oom)",
            )
        )
    code = terminated.exit_code if terminated is not None else None
    if code == _KILLED_EXIT:
        # A container killed by a signal exits 128 + the signal: 137 is SIGKILL,
        # sent by something other than the kernel's OOM killer (reported above).
        return _Outcome(
            exit=StepExit(
                reason="killed",
                exit_code=code,
                message="the step's container was killed by SIGKILL before it"
                " committed; run the step again",
            )
        )
    return _Outcome(exit=StepExit(reason="exited", exit_code=code))


class _PodWatch:
    """Watches the pod of one Job, resuming after disconnects.

    A watch that ends (its timeout, or a broken connection) is resumed from the
    last resource version seen; when that version is too old (410 Gone), it
    starts again from the current state, which repeats the pod as ADDED. Once
    the caller sets a deadline (a pod waiting to be scheduled), the watch is
    started again with a read timeout that ends at the deadline, and the last
    pod is repeated as WOKEN then, so the caller notices the deadline while
    nothing changes. A successful step never pays for that second watch.
    """

    def __init__(self, core: client.CoreV1Api, name: str, namespace: str) -> None:
        self.core = core
        self.name = name
        self.namespace = namespace
        self.deadline: float | None = None

    def events(self) -> Iterator[tuple[str, Any]]:
        version: str | None = None
        last: Any = None
        decoder = watch.Watch()
        while True:
            deadline = self.deadline
            try:
                for event in self._stream(version, decoder, deadline):
                    if event["type"] == "ERROR":
                        raise ApiException(status=event["raw_object"].get("code"))
                    last = event["object"]
                    version = last.metadata.resource_version
                    if event["type"] != "BOOKMARK":
                        yield event["type"], last
                    if self.deadline != deadline:
                        break  # watch again, with a read timeout for the deadline
            except ApiException as error:
                if error.status != 410:
                    raise cluster_error(error, "watch the step's pod") from error
                version = None
            except (HTTPError, OSError, ValueError) as error:
                if deadline is None or time.monotonic() < deadline:
                    logger.debug(
                        "pod watch of %s broke (%r); resuming", self.name, error
                    )
                    time.sleep(0.2)
            if deadline is not None and time.monotonic() >= deadline and last:
                yield "WOKEN", last

    def _stream(
        self, version: str | None, decoder: Any, deadline: float | None
    ) -> Iterator[dict[str, Any]]:
        read_timeout = None
        if deadline is not None:
            read_timeout = max(0.1, deadline - time.monotonic())
        response = self.core.list_namespaced_pod(
            self.namespace,
            label_selector=f"job-name={self.name}",
            resource_version=version,
            timeout_seconds=_WATCH_SECONDS,
            allow_watch_bookmarks=True,
            watch=True,
            _preload_content=False,
            _request_timeout=(10, read_timeout) if read_timeout else None,
        )
        try:
            for line in watch.watch.iter_resp_lines(response):
                yield decoder.unmarshal_event(line, "V1Pod")
        finally:
            response.close()
            response.release_conn()


class _LogFollower:
    """Streams the pod's log to the caller while the step runs."""

    def __init__(
        self, core: client.CoreV1Api, namespace: str, on_output: OutputCallback | None
    ) -> None:
        self.core = core
        self.namespace = namespace
        self.on_output = on_output
        self.thread: threading.Thread | None = None
        self.pieces: list[str] = []

    def start_if_running(self, pod: Any) -> None:
        status = _container_status(pod)
        state = status.state if status else None
        started = state is not None and (state.running or state.terminated)
        if self.thread is None and started:
            self.thread = threading.Thread(
                target=self._follow, args=(pod.metadata.name,), daemon=True
            )
            self.thread.start()

    def _follow(self, pod: str) -> None:
        import codecs

        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        try:
            response = self.core.read_namespaced_pod_log(
                pod,
                self.namespace,
                container=CONTAINER,
                follow=True,
                _preload_content=False,
            )
            for chunk in response.stream(64 * 1024):
                self._emit(decoder.decode(chunk))
            response.release_conn()
        except (ApiException, HTTPError) as error:
            # The log is for watching; the result comes from the store.
            logger.debug("the log of pod %s ended early: %r", pod, error)

    def _emit(self, text: str) -> None:
        if not text:
            return
        self.pieces.append(text)
        del self.pieces[:-20]
        if self.on_output is not None:
            self.on_output("stdout", text)

    def join(self) -> None:
        if self.thread is not None:
            self.thread.join(timeout=10)

    def tail(self) -> str:
        return "".join(self.pieces)
