"""A Kubernetes API server, job controller and kubelet for tests, in-process.

Tests talk to it with the official ``kubernetes`` client over real HTTP on
127.0.0.1. It serves what jobrunner uses, strictly and with complete objects:

- ``GET /version``, ``/api``, ``/apis``, ``/api/v1``, ``/apis/batch/v1`` and
  ``GET /api/v1/namespaces/{ns}`` (every valid namespace exists).
- batch/v1 Jobs: create, get, list, watch, patch (merge), delete with
  ``propagationPolicy`` (Jobs default to ``Orphan``, as on a real cluster).
- batch/v1 CronJobs and v1 Secrets: create, get, list, watch, patch, delete;
  stored only, never run.
- v1 Pods: get, list, watch, patch, delete (kills the process) and
  ``pods/{name}/log`` with ``follow``, ``container``, ``tailLines``, ``stream``.
- v1 Events: get, list, watch, with ``involvedObject.*`` field selectors.
- Anything else: 404 with a ``Status``. Invalid objects: 422 ``Invalid``,
  duplicate names: 409 ``AlreadyExists``, malformed selectors: 400.

Watches take ``resourceVersion`` (resume after it), ``timeoutSeconds`` and
selectors; a compacted version is reported as a watch event ``ERROR`` with a
410 ``Status``, which the client's ``Watch.stream`` raises as ``ApiException``.

Each Job gets one pod at a time (``<job>-<5 chars>``, labelled ``job-name``,
``batch.kubernetes.io/job-name``, ``controller-uid`` and
``batch.kubernetes.io/controller-uid``). The pod's first container runs as a
local process in a new process group: ``command`` + ``args`` (``$(VAR)``
expanded; ``python``/``python3``, with or without a folder, become
``sys.executable``), environment = ``os.environ`` + ``PYTHONPATH`` (the
non-installation folders of this process's ``sys.path``, so the checkout is
importable) + ``extra_env`` + ``HOSTNAME`` + the container's ``env`` and
``envFrom`` (Secrets resolved), working directory = ``workingDir`` if it exists
here, else a fresh folder per pod that survives in-place restarts. stdout and
stderr are the pod log (pipes: Python block-buffers them unless flushed or
``PYTHONUNBUFFERED`` is set, as in a real pod). A pod's log is readable once
its container has started; before that the answer is 400, as on a cluster.
Logs hold whole lines per stream, so stdout and stderr never split a line.
``backoffLimit``, ``activeDeadlineSeconds`` and ``ttlSecondsAfterFinished`` are
honoured; ``restartPolicy: OnFailure`` restarts the process in the same pod.

Container mode (``KubeServer(runtime="container", engine=...)``) runs the
pod's first container in a real container of its image instead, through podman
or docker (see ``_container.py``): ``command``/``args``/``env``/``envFrom``,
``workingDir``, the merged security context (user and group, ``fsGroup``,
read-only root, capabilities, no privilege escalation, ``runAsNonRoot``
checked against the image), CPU and memory limits (a real OOM kill is reported
as ``OOMKilled``), volumes (``emptyDir``, ``hostPath``, and
``persistentVolumeClaim`` bound to host folders by ``claims``) and the host's
network. The image is pulled by ``imagePullPolicy``; a failed pull is
``ErrImagePull`` then ``ImagePullBackOff`` with the engine's message.

Faults, per Job: an annotation ``kubeserver.test/fault`` (on the Job or its pod
template) set to ``oom``, ``evict``, ``image-pull`` or ``unschedulable``, with
an optional ``kubeserver.test/fault-after`` in seconds; or ``server.inject(...)``
for the next matching pods. An image in ``server.missing_images`` or matching
``server.missing_image_pattern`` (default ``does-not-exist``) cannot be pulled.

Inspection: ``server.requests`` lists every request as ``(method, path)``
(``requests_with_query`` adds the query string), ``server.reset_requests()``
clears it; ``server.jobs()``, ``pods()``, ``events()``, ``objects(plural)`` and
``snapshot()`` return copies of stored objects; ``server.pod_log(ns, name)``
returns a pod's output; ``server.pod_processes`` counts live pod processes;
``server.compact()`` forgets the change history (older versions get 410).

Import it as ``kubeserver``: pytest puts ``tests/`` on ``sys.path`` (the folder
has no ``__init__.py``), or as ``tests.kubeserver`` from the checkout.

Example:
    with KubeServer() as server:
        server.write_kubeconfig(tmp_path / "config", context="test")
        kubernetes.config.load_kube_config(str(tmp_path / "config"), "test")
        server.inject("oom", job="step-.*")
        ...
        assert ("POST", "/apis/batch/v1/namespaces/default/jobs") in server.requests
        server.reset_requests()
        assert server.pod_processes == 0
"""

from ._errors import ApiError
from ._faults import FAULT_AFTER_ANNOTATION, FAULT_ANNOTATION, Fault
from ._server import KubeServer

__all__ = [
    "FAULT_AFTER_ANNOTATION",
    "FAULT_ANNOTATION",
    "ApiError",
    "Fault",
    "KubeServer",
]
