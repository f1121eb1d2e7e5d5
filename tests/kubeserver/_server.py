"""The ``KubeServer`` object tests start, inspect and stop."""

from __future__ import annotations

import copy
import logging
import secrets
import threading
from collections.abc import Mapping
from http.server import ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import yaml

from ._container import ContainerRuntime, Engine
from ._controller import Cluster, Settings
from ._faults import DEFAULT_AFTER, Fault, Faults
from ._http import Handler
from ._store import Object, Store

logger = logging.getLogger(__name__)


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    kube: KubeServer


class KubeServer:
    """A Kubernetes API server, job controller and kubelet for tests.

    Args:
        token: The bearer token clients must send; the kubeconfig carries it.
            None accepts any request.
        history_limit: How many changes a watch can resume from.
        extra_env: Variables every pod process gets, under the container's own.
        runtime: ``process`` runs each pod's first container as a local
            process (the default); ``container`` runs it in a container of its
            image, with ``engine``.
        engine: The container engine for ``runtime="container"``: anything
            with ``name`` (podman or docker), ``executable`` and ``env``, such
            as ``container_engine.require_engine()``.
        claims: In container mode, the host folder each PersistentVolumeClaim
            (by name) is bound to.

    Attributes:
        missing_images: Images that cannot be pulled.
        missing_image_pattern: A regex; matching images cannot be pulled either.
        image_entrypoints: The entrypoint of an image, for containers without
            a ``command``.
        settings: Timings: ``image_pull_backoff_after``, ``max_grace_seconds``.
    """

    def __init__(
        self,
        token: str | None = "auto",
        history_limit: int = 10_000,
        extra_env: dict[str, str] | None = None,
        runtime: Literal["process", "container"] = "process",
        engine: Engine | None = None,
        claims: Mapping[str, str | Path] | None = None,
    ) -> None:
        self.token = secrets.token_urlsafe(16) if token == "auto" else token
        self.store = Store(history_limit)
        self.settings = Settings(extra_env=dict(extra_env or {}))
        if runtime == "container":
            if engine is None:
                raise ValueError('runtime="container" needs an engine')
            self.settings.containers = ContainerRuntime(engine, dict(claims or {}))
            # Real pulls decide which images are missing.
            self.settings.missing_image_pattern = ""
        elif runtime != "process":
            raise ValueError(f"unknown runtime {runtime!r}: process or container")
        self.faults = Faults()
        self.cluster = Cluster(self.store, self.settings, self.faults)
        self._requests: list[tuple[str, str, str]] = []
        self._requests_lock = threading.Lock()
        self._http: _HTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def claims(self) -> dict[str, str | Path]:
        """Container mode: claim name -> host folder; tests may add to it."""
        if self.settings.containers is None:
            raise RuntimeError('claims exist only with runtime="container"')
        return self.settings.containers.claims

    @property
    def missing_images(self) -> set[str]:
        return self.settings.missing_images

    @property
    def missing_image_pattern(self) -> str:
        return self.settings.missing_image_pattern

    @missing_image_pattern.setter
    def missing_image_pattern(self, pattern: str) -> None:
        self.settings.missing_image_pattern = pattern

    @property
    def image_entrypoints(self) -> dict[str, list[str]]:
        return self.settings.image_entrypoints

    def start(self) -> KubeServer:
        """Listen on 127.0.0.1 on a free port and serve in a thread."""
        self._http = _HTTPServer(("127.0.0.1", 0), Handler)
        self._http.kube = self
        self._thread = threading.Thread(
            target=self._http.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="kubeserver-http",
            daemon=True,
        )
        self._thread.start()
        logger.info("kubeserver listening on %s", self.url)
        return self

    @property
    def address(self) -> str:
        """``host:port`` the server listens on."""
        if self._http is None:
            raise RuntimeError("the server is not started; call start() first")
        host, port = self._http.server_address[:2]
        return f"{host!s}:{port}"

    @property
    def url(self) -> str:
        """The base URL, e.g. ``http://127.0.0.1:41234``."""
        return f"http://{self.address}"

    def stop(self) -> None:
        """Kill every pod process, end open watches and log streams, and close."""
        self.store.close()
        self.cluster.stop()
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)
        logger.info("kubeserver stopped")

    def __enter__(self) -> KubeServer:
        return self.start()

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def kubeconfig(self, context: str = "test", namespace: str = "default") -> Object:
        """Return a kubeconfig (as a dict) pointing at this server."""
        user: dict[str, Any] = {"token": self.token} if self.token else {}
        return {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "kubeserver", "cluster": {"server": self.url}}],
            "users": [{"name": "kubeserver", "user": user}],
            "contexts": [
                {
                    "name": context,
                    "context": {
                        "cluster": "kubeserver",
                        "user": "kubeserver",
                        "namespace": namespace,
                    },
                }
            ],
            "current-context": context,
            "preferences": {},
        }

    def write_kubeconfig(
        self, path: str | Path, context: str = "test", namespace: str = "default"
    ) -> Path:
        """Write a kubeconfig that ``kubernetes.config.load_kube_config`` loads."""
        target = Path(path)
        target.write_text(yaml.safe_dump(self.kubeconfig(context, namespace)))
        return target

    def record_request(self, method: str, path: str, query: str) -> None:
        with self._requests_lock:
            self._requests.append((method, path, query))

    @property
    def requests(self) -> list[tuple[str, str]]:
        """Every API request so far, as ``(method, path)``, in arrival order."""
        with self._requests_lock:
            return [(method, path) for method, path, _ in self._requests]

    @property
    def requests_with_query(self) -> list[tuple[str, str, str]]:
        """Every API request so far, as ``(method, path, query string)``."""
        with self._requests_lock:
            return list(self._requests)

    def reset_requests(self) -> None:
        """Forget the requests counted so far."""
        with self._requests_lock:
            self._requests.clear()

    def inject(
        self,
        fault: Fault | str,
        job: str | None = None,
        namespace: str | None = None,
        times: int | None = 1,
        after: float = DEFAULT_AFTER,
    ) -> None:
        """Make the next pods of matching Jobs fail in a chosen way.

        Args:
            fault: ``oom``, ``image-pull``, ``unschedulable`` or ``evict``.
            job: A regex the Job's whole name must match; None matches all.
            namespace: Only Jobs in this namespace; None matches all.
            times: How many pods it applies to; None for every one.
            after: Seconds after the process starts before ``oom`` or
                ``evict`` strikes.
        """
        self.faults.add(fault, job, namespace, times, after)

    def clear_faults(self) -> None:
        """Drop every injected fault that has not struck yet."""
        self.faults.clear()

    def compact(self) -> None:
        """Forget the change history: older resourceVersions answer 410 Gone."""
        self.store.compact()

    def objects(self, plural: str, namespace: str | None = None) -> list[Object]:
        """Return copies of stored objects (``jobs``, ``pods``, ``events``…)."""
        return self.store.items(plural, namespace)

    def jobs(self, namespace: str | None = None) -> list[Object]:
        """Return copies of the stored Jobs."""
        return self.objects("jobs", namespace)

    def pods(self, namespace: str | None = None) -> list[Object]:
        """Return copies of the stored Pods."""
        return self.objects("pods", namespace)

    def events(self, namespace: str | None = None) -> list[Object]:
        """Return copies of the stored Events."""
        return self.objects("events", namespace)

    @property
    def pod_processes(self) -> int:
        """How many pod processes are alive (0 once everything is cleaned up)."""
        return self.cluster.alive_processes()

    def pod_log(self, namespace: str, name: str) -> bytes:
        """Return a pod's output so far (stdout and stderr interleaved)."""
        runtime = self.cluster.runtime(namespace, name)
        return runtime.log.read(0)[0] if runtime else b""

    def snapshot(self) -> dict[str, list[Object]]:
        """Return a deep copy of every stored object, by resource."""
        plurals = ("jobs", "cronjobs", "pods", "events", "secrets")
        return {plural: copy.deepcopy(self.objects(plural)) for plural in plurals}
