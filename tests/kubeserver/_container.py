"""The kubelet's container mode: a pod's container runs in a real container.

The engine (podman or docker) runs the container of the pod's image with what
the pod spec says and the engine can do: the command, args and environment
(Secrets resolved; values pass through the engine's own environment, so they
never show in its arguments), the user and group, a read-only root filesystem,
dropped capabilities, no privilege escalation, CPU and memory limits, the
working directory and the volumes (``emptyDir``, ``hostPath``, and claims that
the test binds to host folders). The network is the host's, so a store on a
loopback port is reachable.

Images are pulled the way the kubelet does, by ``imagePullPolicy``; with no
registry reachable, a missing image fails a real pull.

A memory limit is enforced by the kernel. Where the engine reports it, the
container's ``State.OOMKilled`` says that the kernel killed it for memory.
podman with runc on cgroup v1 does not report it, so there (as root, with the
cgroupfs manager) each pod gets a cgroup of its own that carries the memory
limit, like the kubelet's pod cgroup, and an OOM notification (an eventfd on
its ``memory.oom_control``) registered before the container starts says
whether the kernel's OOM killer struck inside it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from ._environment import ConfigError, expand
from ._process import PodLog, start_reader
from ._store import Object
from ._validation import parse_quantity

# Engine commands run here: podman's conmon leaves an empty "oom" file in its
# working directory when a container is OOM-killed.
ENGINE_WORKDIR = tempfile.gettempdir()

logger = logging.getLogger(__name__)

LABEL = "kubeserver.test/server"
_MEMORY_CGROUP = Path("/sys/fs/cgroup/memory")
_CALL_TIMEOUT = 60.0
_PULL_TIMEOUT = 120.0


class Engine(Protocol):
    """A container engine CLI: ``tests/container_engine.ContainerEngine`` fits."""

    @property
    def name(self) -> str: ...

    @property
    def executable(self) -> str: ...

    @property
    def env(self) -> Mapping[str, str]: ...


class ImagePullError(Exception):
    """The image is not on the node and cannot be pulled; args[0] is the reason."""


@dataclass
class Launch:
    """One container to start: its engine arguments and the secrets they name."""

    create: list[str]
    env: dict[str, str]
    claims: list[tuple[str, int]] = field(default_factory=list)
    memory: int | None = None


class ContainerRuntime:
    """Runs pods' containers with a container engine.

    Args:
        engine: The engine to call.
        claims: Host folders that ``persistentVolumeClaim`` volumes bind to, by
            claim name.
    """

    def __init__(self, engine: Engine, claims: Mapping[str, str | Path]) -> None:
        self.engine = engine
        self.claims = dict(claims)
        self.server_id = uuid.uuid4().hex[:12]
        self._pod_cgroups = _pod_cgroups_work(engine)
        self._present: set[str] = set()

    def call(
        self, args: list[str], timeout: float = _CALL_TIMEOUT
    ) -> subprocess.CompletedProcess[str]:
        """Run the engine with args, capturing its output; never raises on exit."""
        return subprocess.run(
            [self.engine.executable, *args],
            cwd=ENGINE_WORKDIR,
            env={**os.environ, **self.engine.env},
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def ensure_image(self, image: str, policy: str) -> str:
        """Make the image present as ``imagePullPolicy`` says; return the event.

        Raises:
            ImagePullError: with the waiting reason and message.
        """
        present = image in self._present or self._has(image)
        if present and policy != "Always":
            return f'Container image "{image}" already present on machine'
        if policy == "Never":
            raise ImagePullError(
                "ErrImageNeverPull",
                f'Container image "{image}" is not present with pull policy of Never',
            )
        started = time.monotonic()
        try:
            pulled = self.call(["pull", image], timeout=_PULL_TIMEOUT)
        except subprocess.TimeoutExpired as error:
            raise ImagePullError(
                "ErrImagePull", f"pulling {image} timed out"
            ) from error
        if pulled.returncode != 0:
            raise ImagePullError("ErrImagePull", _last_line(pulled))
        self._present.add(image)
        seconds = time.monotonic() - started
        return f'Successfully pulled image "{image}" in {seconds:.3f}s'

    def _has(self, image: str) -> bool:
        found = self.call(["image", "inspect", image]).returncode == 0
        if found:
            self._present.add(image)
        return found

    def launch(
        self,
        pod: Object,
        container: dict[str, Any],
        variables: dict[str, str],
        scratch: Path,
    ) -> Launch:
        """Return how to create the pod's container, from its spec.

        Raises:
            ConfigError: the spec asks for what this kubelet cannot give.
        """
        security = _security(pod, container)
        user = self._user(container, security)
        launch = Launch(create=[], env={})
        args = [
            "create",
            "--name",
            container_name(pod),
            "--label",
            f"{LABEL}={self.server_id}",
            "--network",
            "host",
            "--hostname",
            pod["metadata"]["name"][:63],
        ]
        args += self._security_args(security, user)
        args += self._resource_args(pod, container, launch)
        args += self._volume_args(pod, container, scratch, launch)
        if container.get("workingDir"):
            args += ["--workdir", container["workingDir"]]
        launch.env = {**variables, "HOSTNAME": pod["metadata"]["name"]}
        for name in launch.env:
            args += ["--env", name]  # the value comes from the engine's environment
        command = [expand(part, variables) for part in container.get("command") or []]
        rest = [expand(part, variables) for part in container.get("args") or []]
        if command:
            args += ["--entrypoint", command[0]]
            rest = command[1:] + rest
        launch.create = [*args, container["image"], *rest]
        return launch

    def _user(self, container: dict[str, Any], security: dict[str, Any]) -> str | None:
        uid, gid = security.get("runAsUser"), security.get("runAsGroup")
        if uid is None:
            image_user = self._image_user(container["image"])
            if security.get("runAsNonRoot") and not _non_root(image_user):
                raise ConfigError(
                    "container has runAsNonRoot and image will run as root"
                    if image_user in ("", "0", "root")
                    else f"container has runAsNonRoot and image has non-numeric user"
                    f" ({image_user}), cannot verify user is non-root"
                )
            return None if gid is None else f"{image_user or 0}:{gid}"
        if security.get("runAsNonRoot") and uid == 0:
            raise ConfigError("container's runAsUser breaks non-root policy")
        return f"{uid}" if gid is None else f"{uid}:{gid}"

    def _image_user(self, image: str) -> str:
        inspected = self.call(
            ["image", "inspect", "--format", "{{.Config.User}}", image]
        )
        return inspected.stdout.strip().split(":")[0]

    def _security_args(self, security: dict[str, Any], user: str | None) -> list[str]:
        args = ["--user", user] if user else []
        if security.get("fsGroup") is not None:
            args += ["--group-add", str(security["fsGroup"])]
        for group in security.get("supplementalGroups") or []:
            args += ["--group-add", str(group)]
        if security.get("readOnlyRootFilesystem"):
            args.append("--read-only")
            if self.engine.name == "podman":
                # podman adds tmpfs at /tmp, /var/tmp and /run to a read-only
                # root; a pod gets only the volumes it declares.
                args.append("--read-only-tmpfs=false")
        if security.get("allowPrivilegeEscalation") is False:
            args += ["--security-opt", "no-new-privileges"]
        capabilities = security.get("capabilities") or {}
        for name in capabilities.get("drop") or []:
            args += ["--cap-drop", name]
        for name in capabilities.get("add") or []:
            args += ["--cap-add", name]
        if security.get("privileged"):
            args.append("--privileged")
        return args

    def _resource_args(
        self, pod: Object, container: dict[str, Any], launch: Launch
    ) -> list[str]:
        limits = (container.get("resources") or {}).get("limits") or {}
        args = []
        if "cpu" in limits:
            args += ["--cpus", f"{parse_quantity(limits['cpu']):.3f}"]
        if "memory" not in limits:
            return args
        memory = int(parse_quantity(limits["memory"]) or 0)
        if self._pod_cgroups:
            # The limit goes on the pod's cgroup, where the OOM is observable;
            # a limit on the container's own cgroup would strike first, in a
            # cgroup the engine removes before anyone can read it.
            launch.memory = memory
            return [*args, "--cgroup-parent", "/" + pod_cgroup(self.server_id, pod)]
        # No swap, as on a Kubernetes node: reaching the limit is an OOM kill.
        return [*args, "--memory", str(memory), "--memory-swap", str(memory)]

    def _volume_args(
        self, pod: Object, container: dict[str, Any], scratch: Path, launch: Launch
    ) -> list[str]:
        volumes = {v["name"]: v for v in pod["spec"].get("volumes") or []}
        group = _security(pod, container).get("fsGroup")
        args: list[str] = []
        for mount in container.get("volumeMounts") or []:
            volume = volumes.get(mount["name"])
            if volume is None:
                raise ConfigError(f'volume "{mount["name"]}" not found in the pod')
            suffix = ":ro" if mount.get("readOnly") else ""
            target = mount["mountPath"]
            if "emptyDir" in volume and volume["emptyDir"].get("medium") == "Memory":
                args += ["--tmpfs", f"{target}:rw,mode=1777"]
                continue
            source = self._volume_source(volume, scratch)
            if "persistentVolumeClaim" in volume and group is not None:
                launch.claims.append((source, int(group)))
            if mount.get("subPath"):
                source = os.path.join(source, mount["subPath"])
                os.makedirs(source, exist_ok=True)
            args += ["--volume", f"{source}:{target}{suffix}"]
        return args

    def _volume_source(self, volume: dict[str, Any], scratch: Path) -> str:
        if "emptyDir" in volume:
            path = scratch / "volumes" / volume["name"]
            path.mkdir(parents=True, exist_ok=True)
            # An emptyDir is world-writable on the node, as the kubelet makes it.
            path.chmod(0o777)
            return str(path)
        if "hostPath" in volume:
            path = volume["hostPath"]["path"]
            if volume["hostPath"].get("type") == "DirectoryOrCreate":
                os.makedirs(path, exist_ok=True)
            return str(path)
        if "persistentVolumeClaim" in volume:
            claim = volume["persistentVolumeClaim"]["claimName"]
            if claim not in self.claims:
                raise ConfigError(
                    f'persistentvolumeclaim "{claim}" not found; bind it to a'
                    " folder with KubeServer(claims=...)"
                )
            return str(Path(self.claims[claim]).resolve())
        kinds = sorted(set(volume) - {"name"})
        raise ConfigError(f"volume {volume['name']}: {kinds} not supported here")

    def start(self, pod: Object, launch: Launch, log: PodLog) -> ContainerRun:
        """Create and start the container; its output goes to ``log``.

        Raises:
            OSError: the engine could not create the container.
        """
        for path, group in launch.claims:
            _apply_fs_group(Path(path), group)
        oom = None
        if launch.memory is not None:
            oom = _PodCgroup(pod_cgroup(self.server_id, pod), launch.memory)
        env = {**os.environ, **self.engine.env, **launch.env}
        try:
            created = subprocess.run(
                [self.engine.executable, *launch.create],
                cwd=ENGINE_WORKDIR,
                env=env,
                capture_output=True,
                text=True,
                timeout=_CALL_TIMEOUT,
                check=False,
            )
        except subprocess.TimeoutExpired as error:
            if oom:
                oom.close()
            raise OSError(f"creating the container timed out: {error}") from error
        if created.returncode != 0:
            if oom:
                oom.close()
            self.call(["rm", "--force", container_name(pod)])
            raise OSError(_last_line(created))
        return ContainerRun(self, container_name(pod), log, oom)

    def remove_all(self) -> None:
        """Remove every container this server made (the stop of the server)."""
        listed = self.call(
            ["ps", "--all", "--quiet", "--filter", f"label={LABEL}={self.server_id}"]
        )
        names = listed.stdout.split()
        if names:
            self.call(["rm", "--force", *names])
        if self._pod_cgroups:
            remove_cgroup(f"kubeserver-{self.server_id}")


class ContainerRun:
    """One started container, watched through ``start --attach``.

    It offers what the kubelet uses of a ``ContainerProcess``: ``started_at``,
    ``alive``, ``wait``, ``kill``, ``terminate`` and ``oom_killed``.
    """

    def __init__(
        self,
        runtime: ContainerRuntime,
        name: str,
        log: PodLog,
        oom: _PodCgroup | None,
    ) -> None:
        self.runtime = runtime
        self.name = name
        self.log = log
        self.oom_killed = False
        self._oom = oom
        self._finished = False
        self._exit_code = 0
        self._lock = threading.Lock()
        self.started_at = time.monotonic()
        self._attached = subprocess.Popen(
            [runtime.engine.executable, "start", "--attach", name],
            cwd=ENGINE_WORKDIR,
            env={**os.environ, **runtime.engine.env},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        assert self._attached.stdout and self._attached.stderr
        self._readers = [
            start_reader(log, "Stdout", self._attached.stdout),
            start_reader(log, "Stderr", self._attached.stderr),
        ]

    @property
    def alive(self) -> bool:
        return self._attached.poll() is None

    def wait(self, timeout: float) -> int | None:
        """Return the container's exit code, or None if it runs after ``timeout``."""
        try:
            self._attached.wait(timeout)
        except subprocess.TimeoutExpired:
            return None
        return self._finish()

    def _finish(self) -> int:
        with self._lock:
            if self._finished:
                return self._exit_code
            self._finished = True
            for reader in self._readers:
                reader.join(timeout=5)
            self._exit_code, self.oom_killed = self._inspect()
            if self._oom is not None:
                self.oom_killed = self.oom_killed or self._oom.struck()
                self._oom.close()
            self.runtime.call(["rm", "--force", self.name])
            self.log.close()
            return self._exit_code

    def _inspect(self) -> tuple[int, bool]:
        inspected = self.runtime.call(
            ["inspect", "--format", "{{json .State}}", self.name]
        )
        if inspected.returncode != 0:
            # The attach client's own code: the container's, or the engine's.
            code = self._attached.returncode
            return (128 - code if code < 0 else code), False
        state = json.loads(inspected.stdout)
        return int(state.get("ExitCode", 0)), bool(state.get("OOMKilled"))

    def kill(self) -> int:
        """SIGKILL the container and return its exit code (137)."""
        self.runtime.call(["kill", "--signal", "KILL", self.name])
        self._attached.wait()
        self._finish()
        return 137

    def terminate(self, grace: float) -> int:
        """Stop the container: SIGTERM, then SIGKILL after ``grace`` seconds."""
        seconds = max(0, int(grace))
        self.runtime.call(
            ["stop", "--time", str(seconds), self.name], timeout=seconds + _CALL_TIMEOUT
        )
        self._attached.wait()
        return self._finish()

    def signal(self, signum: int) -> None:
        """Send ``signum`` to the container's main process."""
        self.runtime.call(["kill", "--signal", signal.Signals(signum).name, self.name])


class _PodCgroup:
    """A pod's memory cgroup (v1) with its limit and an OOM notification."""

    def __init__(self, relative: str, limit: int) -> None:
        self.relative = relative
        self.path = _MEMORY_CGROUP / relative
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / "memory.limit_in_bytes").write_text(str(limit))
        # Without a swap limit a node with swap would page instead of killing.
        with contextlib.suppress(OSError):
            (self.path / "memory.memsw.limit_in_bytes").write_text(str(limit))
        self._event = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._control = os.open(self.path / "memory.oom_control", os.O_RDONLY)
        (self.path / "cgroup.event_control").write_text(
            f"{self._event} {self._control}"
        )

    def struck(self) -> bool:
        """Whether the OOM killer struck in this cgroup since it was made."""
        try:
            return os.eventfd_read(self._event) > 0
        except BlockingIOError:
            return False

    def close(self) -> None:
        os.close(self._control)
        os.close(self._event)
        remove_cgroup(self.relative)


def remove_cgroup(relative: str) -> None:
    """Remove a cgroup folder and its children from every v1 controller."""
    # The engine makes the parent in every controller, and leaves an empty
    # cgroup for its monitor process beside the container's; cgroups go
    # leaves first, and only once empty.
    for controller in _MEMORY_CGROUP.parent.iterdir():
        top = controller / relative
        if not top.is_dir() or top.is_symlink():
            continue
        folders = [path for path in top.rglob("*") if path.is_dir()]
        for folder in [*sorted(folders, key=lambda path: -len(path.parts)), top]:
            with contextlib.suppress(OSError):
                folder.rmdir()


def container_name(pod: Object) -> str:
    """The engine's name for a pod's container: unique per pod."""
    return f"kubeserver-{pod['metadata']['namespace']}-{pod['metadata']['uid'][:13]}"


def pod_cgroup(server_id: str, pod: Object) -> str:
    """The pod's cgroup, relative to a controller's root."""
    return f"kubeserver-{server_id}/pod{pod['metadata']['uid']}"


def _pod_cgroups_work(engine: Engine) -> bool:
    """Whether pods need (and can have) a memory cgroup of their own."""
    if engine.name != "podman" or os.geteuid() != 0:
        return False
    if not (_MEMORY_CGROUP / "cgroup.event_control").exists():
        return False
    info = subprocess.run(
        [engine.executable, "info", "--format", "{{.Host.CgroupManager}}"],
        cwd=ENGINE_WORKDIR,
        env={**os.environ, **engine.env},
        capture_output=True,
        text=True,
        timeout=_CALL_TIMEOUT,
        check=False,
    )
    return info.stdout.strip() == "cgroupfs"


def _security(pod: Object, container: dict[str, Any]) -> dict[str, Any]:
    """The container's security context over the pod's, as the kubelet merges."""
    merged = dict(pod["spec"].get("securityContext") or {})
    merged.update(container.get("securityContext") or {})
    return merged


def _non_root(user: str) -> bool:
    return user.isdigit() and int(user) != 0


def _apply_fs_group(path: Path, group: int) -> None:
    """Give a claim's files to ``fsGroup``, group-writable, as the kubelet does."""
    for entry in [path, *path.rglob("*")]:
        with contextlib.suppress(FileNotFoundError):
            os.chown(entry, -1, group, follow_symlinks=False)
            if entry.is_symlink():
                continue
            mode = entry.stat().st_mode
            extra = 0o2070 if entry.is_dir() else 0o060
            entry.chmod(mode | extra)


def _last_line(result: subprocess.CompletedProcess[str]) -> str:
    lines = (result.stderr or result.stdout).strip().splitlines()
    return lines[-1] if lines else f"exit code {result.returncode}"
