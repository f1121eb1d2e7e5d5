"""The step image runs the step runtime the way a step's pod does.

Building the image the first time bootstraps a Debian base (about a minute here,
more on a busy machine), hence the long timeout; later builds hit the layer cache.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from container_engine import (
    STEP_UID,
    ContainerEngine,
    Mount,
    ensure_step_image,
    image_size,
    make_writable_for_step,
    require_engine,
    run_step_container,
)

pytestmark = [pytest.mark.container, pytest.mark.timeout(1800)]

# The Debian base with Python is about 130 MB and the runtime's packages about
# 60 MB, botocore (under s3fs) most of it; the image was 190 MB when this was
# written. 250 MB leaves room for dependency growth and still fails on what must
# not be there: a compiler toolchain, a pip cache or the control side's packages.
SIZE_LIMIT_BYTES = 250_000_000

ENTRYPOINT = ["python", "-m", "jobrunner.runtime"]


@pytest.fixture(scope="module")
def engine() -> ContainerEngine:
    return require_engine()


@pytest.fixture(scope="module")
def image(engine: ContainerEngine) -> str:
    return ensure_step_image(engine)


def _inspect(engine: ContainerEngine, image: str) -> dict[str, Any]:
    result = engine.run(["image", "inspect", image])
    assert result.returncode == 0, result.stderr
    config: dict[str, Any] = json.loads(result.stdout)[0]["Config"]
    return config


def _python(
    engine: ContainerEngine,
    image: str,
    code: str,
    mounts: Sequence[Mount] = (),
    user: str | None = str(STEP_UID),
) -> subprocess.CompletedProcess[str]:
    return run_step_container(
        engine, image, ["-c", code], mounts=mounts, entrypoint="python", user=user
    )


def test_entrypoint_is_the_step_runtime(engine: ContainerEngine, image: str) -> None:
    assert _inspect(engine, image)["Entrypoint"] == ENTRYPOINT

    result = run_step_container(engine, image, [])

    assert result.returncode == 2
    assert "usage:" in result.stderr
    assert "--store" in result.stderr


def test_a_job_can_give_the_whole_command(engine: ContainerEngine, image: str) -> None:
    result = run_step_container(
        engine, image, [*ENTRYPOINT[1:], "--help"], entrypoint=ENTRYPOINT[0]
    )

    assert result.returncode == 0, result.stderr
    assert "--session" in result.stdout


def test_holds_the_runtime_dependencies_and_not_the_control_side(
    engine: ContainerEngine, image: str
) -> None:
    code = """
import importlib.util, json
names = ["dill", "fsspec", "s3fs", "jobrunner", "kubernetes", "typer", "rich"]
print(json.dumps({n: importlib.util.find_spec(n) is not None for n in names}))
import dill, fsspec, s3fs, jobrunner.runtime.__main__
"""
    result = _python(engine, image, code)

    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {
        "dill": True,
        "fsspec": True,
        "s3fs": True,
        "jobrunner": True,
        "kubernetes": False,
        "typer": False,
        "rich": False,
    }


def test_runs_as_the_fixed_non_root_user(engine: ContainerEngine, image: str) -> None:
    assert _inspect(engine, image)["User"] == f"{STEP_UID}:{STEP_UID}"

    result = _python(
        engine, image, "import os; print(os.getuid(), os.getgid())", user=None
    )

    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [str(STEP_UID), str(STEP_UID)]


def test_works_on_a_read_only_root_filesystem(
    engine: ContainerEngine, image: str
) -> None:
    code = """
import errno, importlib.util, json, os, sys, tempfile
import s3fs, jobrunner.runtime.__main__ as runtime
with tempfile.NamedTemporaryFile(dir=os.environ["HOME"]) as scratch:
    scratch.write(b"x")
try:
    open(os.path.join(sys.prefix, "written"), "w")
except OSError as error:
    root = errno.errorcode[error.errno]
print(json.dumps({
    "cwd": os.getcwd(), "tmp": tempfile.gettempdir(), "root": root,
    "compiled": os.path.exists(importlib.util.cache_from_source(runtime.__file__)),
    "dont_write_bytecode": sys.dont_write_bytecode,
}))
"""
    result = _python(engine, image, code)

    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {
        "cwd": "/tmp",
        "tmp": "/tmp",
        "root": "EROFS",
        "compiled": True,
        "dont_write_bytecode": True,
    }


def test_a_mounted_store_folder_is_writable(
    engine: ContainerEngine, image: str, tmp_path: Path
) -> None:
    store = tmp_path / "store"
    store.mkdir()
    make_writable_for_step(store)
    code = "open('/store/written', 'w').write('from the step')"

    result = _python(engine, image, code, mounts=[Mount(store, "/store")])

    assert result.returncode == 0, result.stderr
    assert (store / "written").read_text() == "from the step"


def test_a_memory_limit_kills_the_step(engine: ContainerEngine, image: str) -> None:
    code = "blocks = [b'x' * 2**20 for _ in range(512)]"

    result = run_step_container(
        engine, image, ["-c", code], entrypoint="python", memory="64m"
    )

    assert result.returncode == 137


def test_image_size_is_under_the_limit(engine: ContainerEngine, image: str) -> None:
    size = image_size(engine, image)

    assert size < SIZE_LIMIT_BYTES, f"{image} is {size / 1e6:.0f} MB"
