"""The kind demo runs end to end: a real cluster, the real image, MinIO.

It needs a working Docker daemon, kind and kubectl, and network access for
kind's node image and MinIO's image; elsewhere it is skipped with the reason.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "examples" / "kubernetes" / "kind-demo.sh"

pytestmark = [pytest.mark.kind, pytest.mark.timeout(1800)]


def _missing() -> str | None:
    """Why the demo cannot run here, or None when it can."""
    for tool in ("docker", "kind", "kubectl", "jobrunner"):
        if shutil.which(tool) is None:
            return f"{tool} is not on PATH"
    try:
        info = subprocess.run(
            ["docker", "info"], capture_output=True, text=True, timeout=30, check=False
        )
    except subprocess.TimeoutExpired:
        return "docker info did not answer within 30 s"
    if info.returncode != 0:
        lines = (info.stderr or info.stdout).strip().splitlines()
        return f"docker info fails: {lines[-1] if lines else info.returncode}"
    return None


def test_the_kind_demo_runs_a_three_step_session() -> None:
    reason = _missing()
    if reason is not None:
        pytest.skip(reason)
    # A cluster of its own, so that a developer's demo cluster is left alone.
    cluster = f"jobrunner-test-{uuid.uuid4().hex[:6]}"

    done = subprocess.run(
        [str(DEMO)],
        env={**os.environ, "KIND_CLUSTER": cluster},
        capture_output=True,
        text=True,
        timeout=1700,
        check=False,
    )

    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "radius 2" in done.stdout
    assert "12.566370614359172" in done.stdout, "the last step's value: pi * 2**2"
    clusters = subprocess.run(
        ["kind", "get", "clusters"], capture_output=True, text=True, check=False
    )
    assert cluster not in clusters.stdout.split(), "the script deletes its cluster"
