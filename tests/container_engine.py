"""Find a container engine for the tests, build the step image, run step containers.

Tests that need an engine are marked ``container`` and call `require_engine()`,
which skips them with the reason when neither podman nor docker can run containers
here. Every engine call has a timeout, so a wedged engine fails a test instead of
hanging the run.

Example:
    engine = require_engine()
    image = ensure_step_image(engine)
    result = run_step_container(
        engine,
        image,
        ["--store", "file:///store", "--session", "s1", "--attempt", "a1"],
        mounts=[Mount(store_dir, "/store")],
    )
    assert result.returncode == 0, result.stderr
"""

from __future__ import annotations

import atexit
import functools
import logging
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
BUILD_SCRIPT = REPO_ROOT / "step_image" / "build-local.sh"
DEFAULT_STEP_IMAGE = "localhost/jobrunner-step:dev"
STEP_UID = 10001

ENGINE_ENV = "JOBRUNNER_CONTAINER_ENGINE"
"""Names the engine to use (podman or docker) instead of the first that works."""

PREBUILT_IMAGE_ENV = "JOBRUNNER_STEP_IMAGE"
"""Names a step image to test as it is, instead of building one."""

_PROBE_TIMEOUT = 60.0
_CALL_TIMEOUT = 60.0
_BUILD_TIMEOUT = 1800.0

# podman on hosts with hybrid cgroups fails with crun and with the host's high
# ulimits; runc and explicit lower limits work there and everywhere else.
_PODMAN_CONF = """\
[containers]
default_ulimits = ["nofile=1024:1024", "nproc=4096:4096"]

[engine]
runtime = "runc"
"""


class ContainerEngineError(RuntimeError):
    """An engine command failed; the message carries the end of its output."""


# The folder engine commands run in: podman's conmon leaves an empty "oom" file
# in its working directory when a container is OOM-killed, which must not land
# in the repository.
ENGINE_WORKDIR = tempfile.gettempdir()


@dataclass(frozen=True)
class ContainerEngine:
    """A container engine CLI and the environment that every call to it needs."""

    name: str
    executable: str
    env: Mapping[str, str] = field(default_factory=dict, hash=False)

    def run(
        self, args: Sequence[str], timeout: float = _CALL_TIMEOUT
    ) -> subprocess.CompletedProcess[str]:
        """Run the engine with args and capture its output; never raises on exit."""
        return subprocess.run(
            [self.executable, *args],
            cwd=ENGINE_WORKDIR,
            env={**os.environ, **self.env},
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )


@dataclass(frozen=True)
class Mount:
    """A host folder bind-mounted into a container."""

    source: Path
    target: str
    read_only: bool = False

    def option(self) -> str:
        suffix = ":ro" if self.read_only else ""
        return f"{Path(self.source).resolve()}:{self.target}{suffix}"


def find_engine() -> ContainerEngine | str:
    """Find an engine that can run containers here.

    Returns:
        The engine, or a sentence saying why none is usable (for a skip message).
    """
    wanted = os.environ.get(ENGINE_ENV)
    candidates = [wanted] if wanted else ["podman", "docker"]
    reasons = []
    for name in candidates:
        engine_or_reason = _probe(name)
        if isinstance(engine_or_reason, ContainerEngine):
            logger.info("using container engine %s", engine_or_reason.executable)
            return engine_or_reason
        reasons.append(engine_or_reason)
    return "no usable container engine: " + "; ".join(reasons)


@functools.cache
def _cached_engine() -> ContainerEngine | str:
    return find_engine()


def require_engine() -> ContainerEngine:
    """The engine found once per test process; skips the calling test if none."""
    engine_or_reason = _cached_engine()
    if isinstance(engine_or_reason, str):
        pytest.skip(engine_or_reason)
    return engine_or_reason


def image_exists(engine: ContainerEngine, image: str) -> bool:
    """Whether the engine has the image locally."""
    return engine.run(["image", "inspect", image]).returncode == 0


def image_size(engine: ContainerEngine, image: str) -> int:
    """The image's unpacked size in bytes, as the engine reports it."""
    result = engine.run(["image", "inspect", "--format", "{{.Size}}", image])
    _check(result, f"inspecting {image}")
    return int(result.stdout.strip())


def build_step_image(
    engine: ContainerEngine,
    tag: str = DEFAULT_STEP_IMAGE,
    extra_requirements: Path | None = None,
    timeout: float = _BUILD_TIMEOUT,
) -> None:
    """Build the step image with step_image/build-local.sh.

    The engine's layer cache makes a rebuild of unchanged sources take seconds, and
    the base image is made once per machine.

    Raises:
        ContainerEngineError: the build failed; the message ends with its output.
    """
    command = [str(BUILD_SCRIPT), "--engine", engine.name, "--tag", tag]
    if extra_requirements is not None:
        command += ["--extra-requirements", str(extra_requirements)]

    started = time.monotonic()
    result = subprocess.run(
        command,
        env={**os.environ, **engine.env},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    _check(result, f"building {tag}")
    logger.info("built %s in %.0f s", tag, time.monotonic() - started)


_built_images: set[tuple[str, str]] = set()


def ensure_step_image(engine: ContainerEngine, tag: str = DEFAULT_STEP_IMAGE) -> str:
    """The step image to test: a prebuilt one if named, else built once per process.

    An existing tag is rebuilt rather than reused as it is, because it may hold an
    older jobrunner than the work tree; the layer cache keeps that cheap. Setting
    JOBRUNNER_STEP_IMAGE tests that image as it is.
    """
    prebuilt = os.environ.get(PREBUILT_IMAGE_ENV)
    if prebuilt:
        if not image_exists(engine, prebuilt):
            raise ContainerEngineError(
                f"{PREBUILT_IMAGE_ENV}={prebuilt} names an image that {engine.name} "
                "does not have; build it or unset the variable"
            )
        return prebuilt

    if (engine.executable, tag) not in _built_images:
        build_step_image(engine, tag)
        _built_images.add((engine.executable, tag))
    return tag


def run_step_container(
    engine: ContainerEngine,
    image: str,
    args: Sequence[str],
    mounts: Sequence[Mount] = (),
    env: Mapping[str, str] | None = None,
    memory: str | None = None,
    cpus: float | None = None,
    timeout: float = 120.0,
    entrypoint: str | None = None,
    user: str | None = str(STEP_UID),
) -> subprocess.CompletedProcess[str]:
    """Run one container the way a step's pod runs: read-only, non-root, /tmp apart.

    Args:
        engine: The engine to run it with.
        image: The step image.
        args: Arguments after the entrypoint (the runtime's, by default).
        mounts: Host folders to mount, such as a store folder. The step's user must
            be able to write them: see `make_writable_for_step`.
        env: Environment variables for the container.
        memory: A memory limit such as "256m"; exceeding it kills the container
            (exit code 137).
        cpus: A CPU limit such as 0.5.
        timeout: Seconds before the container is removed by force and
            `subprocess.TimeoutExpired` is raised.
        entrypoint: Replaces the image's entrypoint, such as "python".
        user: The user to run as; None keeps the image's own.

    Returns:
        The finished process, with the exit code and the container's stdout and
        stderr.
    """
    name = f"jobrunner-test-{uuid.uuid4().hex[:12]}"
    command = [
        "run",
        "--rm",
        "--name",
        name,
        "--read-only",
        "--tmpfs",
        "/tmp",
        "--network",
        "host",
    ]
    if user is not None:
        command += ["--user", user]
    for mount in mounts:
        command += ["--volume", mount.option()]
    for key, value in (env or {}).items():
        command += ["--env", f"{key}={value}"]
    if memory is not None:
        command += ["--memory", memory]
    if cpus is not None:
        command += ["--cpus", str(cpus)]
    if entrypoint is not None:
        command += ["--entrypoint", entrypoint]
    command += [image, *args]

    try:
        return engine.run(command, timeout=timeout)
    except subprocess.TimeoutExpired:
        # Killing the CLI does not stop the container it started.
        engine.run(["rm", "--force", name])
        raise


def make_writable_for_step(path: Path) -> None:
    """Let the step's user write a folder that will be mounted into a container."""
    if os.geteuid() == 0:
        for entry in [path, *path.rglob("*")]:
            os.chown(entry, STEP_UID, STEP_UID)
    else:
        path.chmod(0o777)


def _probe(name: str) -> ContainerEngine | str:
    executable = shutil.which(name)
    if executable is None:
        return f"{name} is not installed"

    env = _podman_env() if name == "podman" else {}
    engine = ContainerEngine(name, executable, env)
    # Only podman can start a container without an image (the host's own root,
    # under an overlay), which proves the OCI runtime and cgroups work; for docker,
    # a reachable daemon is the best check that needs no image.
    if name == "podman":
        probe = ["run", "--rm", "--network", "host", "--rootfs", "/:O", "true"]
    else:
        probe = ["info"]
    try:
        result = engine.run(probe, timeout=_PROBE_TIMEOUT)
    except subprocess.TimeoutExpired:
        return f"{name} did not answer within {_PROBE_TIMEOUT:.0f} s"
    except OSError as error:
        return f"{name} could not be started: {error}"
    if result.returncode != 0:
        return f"{name} cannot run containers: {_last_line(result)}"
    return engine


def _podman_env() -> dict[str, str]:
    if os.environ.get("CONTAINERS_CONF"):
        return {}
    return {"CONTAINERS_CONF": str(_write_podman_conf())}


@functools.cache
def _write_podman_conf() -> Path:
    directory = Path(tempfile.mkdtemp(prefix="jobrunner-podman-"))
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    path = directory / "containers.conf"
    path.write_text(_PODMAN_CONF)
    return path


def _check(result: subprocess.CompletedProcess[str], action: str) -> None:
    if result.returncode == 0:
        return
    output = (result.stdout + result.stderr).strip().splitlines()
    tail = "\n".join(output[-30:])
    raise ContainerEngineError(
        f"{action} failed with exit code {result.returncode}:\n{tail}"
    )


def _last_line(result: subprocess.CompletedProcess[str]) -> str:
    lines = (result.stderr or result.stdout).strip().splitlines()
    return lines[-1] if lines else f"exit code {result.returncode}"
