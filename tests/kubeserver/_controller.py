"""The job controller and the kubelet: Jobs get pods, pods run as processes."""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import random
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._container import ContainerRun, ContainerRuntime, ImagePullError
from ._environment import ConfigError, command_line, container_env, process_env
from ._errors import ApiError
from ._faults import Fault, Faults, Injection, from_annotations
from ._process import ContainerProcess, PodLog
from ._status import (
    container_status,
    event,
    qos_class,
    set_condition,
    terminated,
    waiting,
)
from ._store import Object, Store, now

logger = logging.getLogger(__name__)

NODE_NAME = "kubeserver-node"
_POLL = 0.02
_NAME_CHARACTERS = "bcdfghjklmnpqrstvwxz2456789"
_EVICTION_MESSAGE = (
    "The node was low on resource: memory. Threshold quantity: 100Mi, "
    "available: 51200Ki. "
)
_UNSCHEDULABLE_MESSAGE = (
    "0/1 nodes are available: 1 Insufficient memory. preemption: 0/1 nodes are "
    "available: 1 No preemption victims found for incoming pod."
)
_DEADLINE_MESSAGE = "Pod was active on the node longer than the specified deadline"


def random_suffix() -> str:
    """Return the five characters the API server appends to a generateName."""
    return "".join(random.choices(_NAME_CHARACTERS, k=5))


@dataclass
class Settings:
    """What a test can tune about the simulated node; see ``KubeServer``."""

    missing_images: set[str] = field(default_factory=set)
    missing_image_pattern: str = "does-not-exist"
    image_entrypoints: dict[str, list[str]] = field(default_factory=dict)
    extra_env: dict[str, str] = field(default_factory=dict)
    image_pull_backoff_after: float = 0.2
    max_grace_seconds: float = 2.0
    containers: ContainerRuntime | None = None


@dataclass
class PodRuntime:
    """What the kubelet holds for one pod: its log, process and deletion flag."""

    namespace: str
    name: str
    log: PodLog = field(default_factory=PodLog)
    process: ContainerProcess | ContainerRun | None = None
    deletion: threading.Event = field(default_factory=threading.Event)
    grace: float = 30.0
    started_at: str = ""

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.alive


@dataclass
class Ending:
    """How a container's run ended, and what the pod should say about it."""

    outcome: str
    exit_code: int = 0
    reason: str = "Completed"
    pod_reason: str | None = None
    pod_message: str | None = None


class Cluster:
    """The job controller plus one kubelet, driving objects in a ``Store``.

    Args:
        store: Where the objects live.
        settings: Images, entrypoints, environment and timings.
        faults: Injected faults, consumed by the pods they match.
    """

    def __init__(self, store: Store, settings: Settings, faults: Faults) -> None:
        self.store = store
        self.settings = settings
        self.faults = faults
        self.stopping = threading.Event()
        self._runtimes: dict[tuple[str, str], PodRuntime] = {}
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._workdir = tempfile.mkdtemp(prefix="kubeserver-")

    def spawn(self, target: Callable[[], None], name: str) -> None:
        """Run ``target`` in a thread that ``stop`` joins."""
        thread = threading.Thread(target=target, name=name, daemon=True)
        with self._lock:
            self._threads = [t for t in self._threads if t.is_alive()]
            self._threads.append(thread)
        thread.start()

    def start_job(self, job: Object) -> None:
        """Start the controller loop for a newly created Job."""
        worker = _JobWorker(self, job)
        self.spawn(worker.run, f"kubeserver-job-{job['metadata']['name']}")

    def record(
        self,
        involved: Object,
        kind: str,
        reason: str,
        message: str,
        component: str,
        field_path: str | None = None,
    ) -> None:
        """Store an Event about a Job or Pod."""
        self.store.create(
            "events", event(involved, kind, reason, message, component, field_path)
        )

    def runtime(self, namespace: str, name: str) -> PodRuntime | None:
        with self._lock:
            return self._runtimes.get((namespace, name))

    def add_runtime(self, runtime: PodRuntime) -> None:
        with self._lock:
            self._runtimes[(runtime.namespace, runtime.name)] = runtime

    def pod_workdir(self, pod: Object) -> str:
        path = os.path.join(
            self._workdir, pod["metadata"]["namespace"], pod["metadata"]["name"]
        )
        os.makedirs(path, exist_ok=True)
        return path

    def alive_processes(self) -> int:
        """Count pod processes still running."""
        with self._lock:
            return sum(1 for runtime in self._runtimes.values() if runtime.running)

    def delete_pod(self, namespace: str, name: str, grace: float | None) -> Object:
        """Delete a pod; a running one is terminated first, as the kubelet does.

        Raises:
            ApiError: 404 when the pod does not exist.
        """
        pod = self.store.get("pods", namespace, name)
        runtime = self.runtime(namespace, name)
        if runtime is None or not runtime.running:
            if runtime:
                runtime.deletion.set()
            return self.store.delete("pods", namespace, name)
        seconds = pod["spec"].get("terminationGracePeriodSeconds", 30)
        runtime.grace = float(seconds if grace is None else grace)

        def mark(obj: Object) -> None:
            obj["metadata"]["deletionTimestamp"] = now()
            obj["metadata"]["deletionGracePeriodSeconds"] = int(runtime.grace)

        marked = self.store.update("pods", namespace, name, mark) or pod
        runtime.deletion.set()
        return marked

    def delete_job(self, namespace: str, name: str, policy: str) -> Object:
        """Delete a Job with a propagation policy; its pods go unless orphaned.

        Raises:
            ApiError: 404 when the Job does not exist.
        """
        job = self.store.get("jobs", namespace, name)
        pods = self._job_pods(job)
        if policy == "Orphan":
            for pod in pods:
                self.store.update("pods", namespace, pod["metadata"]["name"], _orphan)
            return self.store.delete("jobs", namespace, name)
        if policy == "Background":
            deleted = self.store.delete("jobs", namespace, name)
            self._delete_pods(pods)
            return deleted

        def mark(obj: Object) -> None:
            obj["metadata"]["deletionTimestamp"] = now()
            obj["metadata"]["finalizers"] = ["foregroundDeletion"]

        marked = self.store.update("jobs", namespace, name, mark) or job
        self._delete_pods(pods)
        self.spawn(lambda: self._finish_foreground(job), f"kubeserver-gc-{name}")
        return marked

    def _job_pods(self, job: Object) -> list[Object]:
        uid = job["metadata"]["uid"]
        return self.store.items(
            "pods",
            job["metadata"]["namespace"],
            lambda pod: pod["metadata"].get("labels", {}).get("controller-uid") == uid,
        )

    def _delete_pods(self, pods: list[Object]) -> None:
        for pod in pods:
            # Already gone when the kubelet finished deleting it meanwhile.
            with contextlib.suppress(ApiError):
                self.delete_pod(
                    pod["metadata"]["namespace"], pod["metadata"]["name"], None
                )

    def _finish_foreground(self, job: Object) -> None:
        while self._job_pods(job) and not self.stopping.wait(_POLL):
            pass
        # Already gone when another request deleted it meanwhile.
        with contextlib.suppress(ApiError):
            self.store.delete(
                "jobs", job["metadata"]["namespace"], job["metadata"]["name"]
            )

    def stop(self) -> None:
        """Kill every pod process, end every loop and remove the pods' folders."""
        self.stopping.set()
        with self._lock:
            runtimes = list(self._runtimes.values())
            threads = list(self._threads)
        for runtime in runtimes:
            if runtime.process is not None:
                runtime.process.kill()
        for thread in threads:
            thread.join(timeout=10)
        if self.settings.containers is not None:
            self.settings.containers.remove_all()
        shutil.rmtree(self._workdir, ignore_errors=True)


def _orphan(pod: Object) -> None:
    pod["metadata"].pop("ownerReferences", None)


class _JobWorker:
    """One Job's controller loop: create a pod, run it, count, retry or finish."""

    def __init__(self, cluster: Cluster, job: Object) -> None:
        self.cluster = cluster
        self.store = cluster.store
        self.job = job
        self.namespace = job["metadata"]["namespace"]
        self.name = job["metadata"]["name"]
        self.uid = job["metadata"]["uid"]
        self.spec = job["spec"]
        self.deadline: float | None = None

    def run(self) -> None:
        try:
            self._run()
        except Exception:
            logger.exception(
                "job controller loop for %s/%s failed", self.namespace, self.name
            )
            raise

    def _run(self) -> None:
        if not self._wait_until_resumed():
            return
        self._start()
        failures = 0
        while self._active():
            runtime, pod = self._create_pod()
            ending = _PodRun(self, runtime, pod).run()
            if ending.outcome == "succeeded":
                self._complete()
                break
            if ending.outcome == "deadline":
                self._fail(
                    "DeadlineExceeded", "Job was active longer than specified deadline"
                )
                break
            if ending.outcome == "stopped":
                return
            failures += 1
            self._count_failure(failures)
            if ending.outcome == "backoff" or failures > self.spec["backoffLimit"]:
                self._fail(
                    "BackoffLimitExceeded",
                    "Job has reached the specified backoff limit",
                )
                break
        self._expire_after_ttl()

    def update(self, change: Callable[[dict[str, Any]], None]) -> Object | None:
        """Change the Job's status; None once the Job is gone."""
        return self.store.update(
            "jobs",
            self.namespace,
            self.name,
            lambda job: change(job.setdefault("status", {})),
        )

    def _active(self) -> bool:
        job = self.store.find("jobs", self.namespace, self.name)
        if job is None or self.cluster.stopping.is_set():
            return False
        metadata = job["metadata"]
        return metadata["uid"] == self.uid and "deletionTimestamp" not in metadata

    def _wait_until_resumed(self) -> bool:
        suspended = bool(self.spec.get("suspend"))
        if suspended:
            self._suspended("True", "JobSuspended", "Job suspended")
        while self._active():
            job = self.store.find("jobs", self.namespace, self.name)
            if job and not job["spec"].get("suspend"):
                self.spec = job["spec"]
                if suspended:
                    self._suspended("False", "JobResumed", "Job resumed")
                return True
            time.sleep(_POLL * 5)
        return False

    def _suspended(self, value: str, reason: str, message: str) -> None:
        def change(status: dict[str, Any]) -> None:
            set_condition(status, "Suspended", value, reason, message, probed=True)

        self.update(change)

    def _start(self) -> None:
        seconds = self.spec.get("activeDeadlineSeconds")
        if seconds is not None:
            self.deadline = time.monotonic() + seconds

        def start(status: dict[str, Any]) -> None:
            status["startTime"] = now()
            status.setdefault("ready", 0)
            status.setdefault("terminating", 0)
            status.setdefault("uncountedTerminatedPods", {})

        self.update(start)

    def _create_pod(self) -> tuple[PodRuntime, Object]:
        template = self.spec["template"]
        name = f"{self.name}-{random_suffix()}"
        labels = {
            **(template["metadata"].get("labels") or {}),
            "batch.kubernetes.io/controller-uid": self.uid,
            "batch.kubernetes.io/job-name": self.name,
            "controller-uid": self.uid,
            "job-name": self.name,
        }
        spec = copy.deepcopy(template["spec"])
        spec.setdefault("serviceAccountName", "default")
        spec.setdefault("serviceAccount", "default")
        spec.setdefault("enableServiceLinks", True)
        spec.setdefault("priority", 0)
        pod = {
            "metadata": {
                "name": name,
                "generateName": f"{self.name}-",
                "namespace": self.namespace,
                "labels": labels,
                "annotations": dict(template["metadata"].get("annotations") or {}),
                "ownerReferences": [
                    {
                        "apiVersion": "batch/v1",
                        "kind": "Job",
                        "name": self.name,
                        "uid": self.uid,
                        "controller": True,
                        "blockOwnerDeletion": True,
                    }
                ],
            },
            "spec": spec,
            "status": {"phase": "Pending", "qosClass": qos_class(spec)},
        }
        runtime = PodRuntime(self.namespace, name)
        self.cluster.add_runtime(runtime)
        created = self.store.create("pods", pod)

        def count(status: dict[str, Any]) -> None:
            status["active"] = 1

        self._announce("Normal", "SuccessfulCreate", f"Created pod: {name}")
        self.update(count)
        return runtime, created

    def _announce(self, kind: str, reason: str, message: str) -> None:
        # Events go first, so that a client that sees a status finds its events.
        job = self.store.find("jobs", self.namespace, self.name)
        if job and job["metadata"]["uid"] == self.uid:
            self.cluster.record(job, kind, reason, message, "job-controller")

    def pick_fault(self, pod: Object) -> Injection | None:
        """The fault for a new pod: an injected rule, else an annotation."""
        injected = self.cluster.faults.take(self.namespace, self.name)
        return injected or from_annotations(pod["metadata"], self.job["metadata"])

    def _finish(self, status: dict[str, Any]) -> None:
        status.pop("active", None)
        status["ready"] = 0

    def _complete(self) -> None:
        def complete(status: dict[str, Any]) -> None:
            self._finish(status)
            status["succeeded"] = 1
            status["completionTime"] = now()
            set_condition(
                status,
                "SuccessCriteriaMet",
                "True",
                "CompletionsReached",
                "Reached expected number of succeeded pods",
                probed=True,
            )
            set_condition(
                status,
                "Complete",
                "True",
                "CompletionsReached",
                "Reached expected number of succeeded pods",
                probed=True,
            )

        self._announce("Normal", "Completed", "Job completed")
        self.update(complete)
        logger.info("job %s/%s completed", self.namespace, self.name)

    def _count_failure(self, failures: int) -> None:
        def count(status: dict[str, Any]) -> None:
            self._finish(status)
            status["failed"] = failures

        self.update(count)

    def _fail(self, reason: str, message: str) -> None:
        def fail(status: dict[str, Any]) -> None:
            self._finish(status)
            set_condition(status, "FailureTarget", "True", reason, message, probed=True)
            set_condition(status, "Failed", "True", reason, message, probed=True)

        self._announce("Warning", reason, message)
        self.update(fail)
        logger.info("job %s/%s failed: %s", self.namespace, self.name, reason)

    def _expire_after_ttl(self) -> None:
        ttl = self.spec.get("ttlSecondsAfterFinished")
        if ttl is None or self.cluster.stopping.wait(ttl):
            return
        job = self.store.find("jobs", self.namespace, self.name)
        if job and job["metadata"]["uid"] == self.uid:
            # Already gone when a client deleted it meanwhile.
            with contextlib.suppress(ApiError):
                self.cluster.delete_job(self.namespace, self.name, "Background")


class _PodRun:
    """The kubelet's work on one pod, from scheduling to termination."""

    def __init__(self, worker: _JobWorker, runtime: PodRuntime, pod: Object) -> None:
        self.worker = worker
        self.cluster = worker.cluster
        self.store = worker.store
        self.runtime = runtime
        self.pod = pod
        self.namespace = pod["metadata"]["namespace"]
        self.name = pod["metadata"]["name"]
        self.container = pod["spec"]["containers"][0]
        self.restarts = 0
        self.last_state: dict[str, Any] = {}

    def update(self, change: Callable[[Object], None]) -> Object | None:
        updated = self.store.update("pods", self.namespace, self.name, change)
        if updated:
            self.pod = updated
        return updated

    def update_status(self, change: Callable[[dict[str, Any]], None]) -> None:
        self.update(lambda pod: change(pod["status"]))

    def record(
        self,
        kind: str,
        reason: str,
        message: str,
        component: str = "kubelet",
        container: bool = True,
    ) -> None:
        path = f"spec.containers{{{self.container['name']}}}" if container else None
        self.cluster.record(self.pod, kind, reason, message, component, path)

    def set_container(self, state: dict[str, Any]) -> None:
        statuses = [
            container_status(self.container, state, self.restarts, self.last_state)
        ]
        # TODO: run every container of a pod; only the first runs (jobrunner's
        # step pods have one), the others are reported as never starting.
        for other in self.pod["spec"]["containers"][1:]:
            statuses.append(container_status(other, waiting("PodInitializing")))
        self.update_status(lambda status: status.update(containerStatuses=statuses))

    def run(self) -> Ending:
        fault = self.worker.pick_fault(self.pod)
        if fault and fault.fault is Fault.UNSCHEDULABLE:
            return self._end(self._unschedulable())
        self._schedule()
        if (fault and fault.fault is Fault.IMAGE_PULL) or self._image_missing():
            return self._end(self._image_pull_fails())
        pulled = self._pull()
        if isinstance(pulled, Ending):
            return self._end(pulled)
        ending = self._run_container(fault, pulled)
        while ending.outcome == "failed" and self._restarts_in_place(ending):
            ending = self._run_container(None, pulled)
        return self._end(ending)

    def _unschedulable(self) -> Ending:
        message = _UNSCHEDULABLE_MESSAGE
        self.record(
            "Warning", "FailedScheduling", message, "default-scheduler", container=False
        )
        self.update_status(
            lambda s: set_condition(
                s, "PodScheduled", "False", "Unschedulable", message
            )
        )
        return self._blocked()

    def _schedule(self) -> None:
        def schedule(pod: Object) -> None:
            pod["spec"]["nodeName"] = NODE_NAME
            status = pod["status"]
            status.update(
                hostIP="10.0.0.2", hostIPs=[{"ip": "10.0.0.2"}], startTime=now()
            )
            set_condition(status, "PodReadyToStartContainers", "True")
            set_condition(status, "Initialized", "True")
            set_condition(
                status,
                "Ready",
                "False",
                "ContainersNotReady",
                f"containers with unready status: [{self.container['name']}]",
            )
            set_condition(
                status,
                "ContainersReady",
                "False",
                "ContainersNotReady",
                f"containers with unready status: [{self.container['name']}]",
            )
            set_condition(status, "PodScheduled", "True")

        self.record(
            "Normal",
            "Scheduled",
            f"Successfully assigned {self.namespace}/{self.name} to {NODE_NAME}",
            "default-scheduler",
            container=False,
        )
        self.update(schedule)
        self.set_container(waiting("ContainerCreating"))

    def _image_missing(self) -> bool:
        image = self.container["image"]
        pattern = self.cluster.settings.missing_image_pattern
        return image in self.cluster.settings.missing_images or bool(
            pattern and re.search(pattern, image)
        )

    def _pull(self) -> str | Ending:
        """In container mode, pull the image as its policy says; the event."""
        image = self.container["image"]
        containers = self.cluster.settings.containers
        if containers is None:
            return f'Container image "{image}" already present on machine'
        policy = self.container.get("imagePullPolicy", "IfNotPresent")
        try:
            return containers.ensure_image(image, policy)
        except ImagePullError as error:
            reason, message = error.args
            if reason == "ErrImageNeverPull":
                self.record("Warning", "ErrImageNeverPull", message)
                self.set_container(waiting(reason, message))
                return self._blocked()
            return self._image_pull_fails(message)

    def _image_pull_fails(self, failure: str | None = None) -> Ending:
        image = self.container["image"]
        reference = image if "/" in image else f"docker.io/library/{image}"
        failure = failure or (
            f'failed to pull and unpack image "{reference}": failed to resolve '
            f'reference "{reference}": {reference}: not found'
        )
        self.record("Normal", "Pulling", f'Pulling image "{image}"')
        self.record("Warning", "Failed", f'Failed to pull image "{image}": {failure}')
        self.record("Warning", "Failed", "Error: ErrImagePull")
        self.set_container(waiting("ErrImagePull", failure))
        if (
            self.cluster.stopping.wait(self.cluster.settings.image_pull_backoff_after)
            or self.runtime.deletion.is_set()
        ):
            return self._blocked()
        self.record("Normal", "BackOff", f'Back-off pulling image "{image}"')
        self.record("Warning", "Failed", "Error: ImagePullBackOff")
        self.set_container(
            waiting(
                "ImagePullBackOff",
                f'Back-off pulling image "{image}": ErrImagePull: {failure}',
            )
        )
        return self._blocked()

    def _blocked(self) -> Ending:
        """Wait, as a pod that cannot start does, for deletion or the deadline."""
        while True:
            if self.runtime.deletion.is_set():
                return Ending("deleted", 137, "Error")
            if self.cluster.stopping.is_set():
                return Ending("stopped")
            if (
                self.worker.deadline is not None
                and time.monotonic() >= self.worker.deadline
            ):
                return Ending("deadline", 0, "", "DeadlineExceeded", _DEADLINE_MESSAGE)
            time.sleep(_POLL)

    def _prepare(self) -> Callable[[], ContainerProcess | ContainerRun]:
        """Resolve the container's configuration; return what starts it.

        Raises:
            ConfigError: a Secret, key, volume or claim is missing, or the
                security context cannot be honoured.
        """
        variables = container_env(self.store, self.pod, self.container)
        containers = self.cluster.settings.containers
        log = self.runtime.log
        if containers is not None:
            variables = {**self.cluster.settings.extra_env, **variables}
            scratch = Path(self.cluster.pod_workdir(self.pod))
            launch = containers.launch(self.pod, self.container, variables, scratch)
            return lambda: containers.start(self.pod, launch, log)

        argv = command_line(
            self.container, variables, self.cluster.settings.image_entrypoints
        )
        env = process_env(variables, self.cluster.settings.extra_env, self.name)
        working = self.container.get("workingDir")
        cwd = (
            working
            if working and os.path.isdir(working)
            else self.cluster.pod_workdir(self.pod)
        )

        def start() -> ContainerProcess:
            if not argv:
                raise FileNotFoundError("no command specified")
            return ContainerProcess(argv, env, cwd, log)

        return start

    def _run_container(self, fault: Injection | None, pulled: str) -> Ending:
        try:
            start = self._prepare()
        except ConfigError as error:
            self.record("Warning", "Failed", f"Error: {error}")
            self.set_container(waiting("CreateContainerConfigError", str(error)))
            return self._blocked()
        self.record("Normal", "Pulled", pulled)
        self.record("Normal", "Created", f"Created container: {self.container['name']}")
        self.runtime.started_at = now()
        try:
            self.runtime.process = start()
        except OSError as error:
            message = f"failed to create containerd task: exec: {error}"
            self.record("Warning", "Failed", f"Error: {message}")
            return Ending("failed", 128, "StartError", None, message)
        self.record("Normal", "Started", f"Started container {self.container['name']}")
        self._running()
        return self._supervise(self.runtime.process, fault)

    def _running(self) -> None:
        self.set_container({"running": {"startedAt": self.runtime.started_at}})

        def ready(status: dict[str, Any]) -> None:
            status.update(
                phase="Running", podIP="10.244.0.7", podIPs=[{"ip": "10.244.0.7"}]
            )
            set_condition(status, "Ready", "True")
            set_condition(status, "ContainersReady", "True")

        self.update_status(ready)
        self.worker.update(lambda status: status.update(ready=1))

    def _supervise(
        self, process: ContainerProcess | ContainerRun, fault: Injection | None
    ) -> Ending:
        strikes = fault and fault.fault in (Fault.OOM, Fault.EVICT)
        strike_at = process.started_at + fault.after if fault and strikes else None
        while True:
            code = process.wait(_POLL)
            if code is not None and process.oom_killed:
                return Ending("failed", code, "OOMKilled")
            if code is not None:
                return Ending(
                    "succeeded" if code == 0 else "failed",
                    code,
                    "Completed" if code == 0 else "Error",
                )
            if self.runtime.deletion.is_set():
                grace = min(self.runtime.grace, self.cluster.settings.max_grace_seconds)
                return Ending("deleted", process.terminate(grace), "Error")
            if self.cluster.stopping.is_set():
                return Ending("stopped", process.kill(), "Error")
            if (
                self.worker.deadline is not None
                and time.monotonic() >= self.worker.deadline
            ):
                return Ending(
                    "deadline",
                    process.kill(),
                    "Error",
                    "DeadlineExceeded",
                    _DEADLINE_MESSAGE,
                )
            if strike_at is not None and time.monotonic() >= strike_at:
                return self._strike(process, fault)

    def _strike(
        self, process: ContainerProcess | ContainerRun, fault: Injection | None
    ) -> Ending:
        code = process.kill()
        if fault and fault.fault is Fault.OOM:
            return Ending("failed", code, "OOMKilled")
        self.record("Warning", "Evicted", _EVICTION_MESSAGE, container=False)
        self.update_status(
            lambda s: set_condition(
                s, "DisruptionTarget", "True", "TerminationByKubelet", _EVICTION_MESSAGE
            )
        )
        return Ending("evicted", code, "Error", "Evicted", _EVICTION_MESSAGE)

    def _restarts_in_place(self, ending: Ending) -> bool:
        if self.pod["spec"].get("restartPolicy") != "OnFailure":
            return False
        self.last_state = terminated(
            ending.exit_code, ending.reason, self.runtime.started_at
        )
        if self.restarts >= self.worker.spec["backoffLimit"]:
            ending.outcome = "backoff"
            return False
        self.restarts += 1
        self.record("Warning", "BackOff", "Back-off restarting failed container")
        self.set_container(
            waiting("CrashLoopBackOff", "back-off restarting failed container")
        )
        return True

    def _end(self, ending: Ending) -> Ending:
        if ending.outcome == "stopped":
            return ending
        started = self.runtime.started_at or now()
        state = terminated(ending.exit_code, ending.reason, started, None)
        succeeded = ending.outcome == "succeeded"
        self._announce_end(ending)
        if self.runtime.process is not None or ending.reason == "StartError":
            self.set_container(state)

        def finish(status: dict[str, Any]) -> None:
            status["phase"] = "Succeeded" if succeeded else "Failed"
            if ending.pod_reason:
                status.update(reason=ending.pod_reason, message=ending.pod_message)
            reason = "PodCompleted" if succeeded else "PodFailed"
            set_condition(status, "Ready", "False", reason)
            set_condition(status, "ContainersReady", "False", reason)
            set_condition(status, "PodReadyToStartContainers", "False")

        self.update_status(finish)
        if ending.outcome == "deleted" and self.runtime.process is not None:
            # Already gone when a second delete request raced this one.
            with contextlib.suppress(ApiError):
                self.store.delete("pods", self.namespace, self.name)
        return ending

    def _announce_end(self, ending: Ending) -> None:
        if ending.outcome == "deadline":
            self.record(
                "Normal", "DeadlineExceeded", _DEADLINE_MESSAGE, container=False
            )
        if ending.outcome == "deleted" and self.runtime.process is not None:
            self.record(
                "Normal", "Killing", f"Stopping container {self.container['name']}"
            )
