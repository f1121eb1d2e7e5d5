"""API requests per step on the Kubernetes backend, counted by the test server.

Run with ``python benchmarks/kubernetes_requests.py``. The test API server in
``tests/kubeserver`` (a strict in-process API server whose kubelet runs each
pod's command as a local process) counts every request the official client
makes; the steps are real steps of a real session. Target: at most 6 requests
for a successful step, whatever its duration.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from kubeserver import KubeServer

from jobrunner import KubernetesBackend, Session

CASES = {
    "short step, no secrets": ("x = 1", None),
    "3-second step, no secrets": ("import time\ntime.sleep(3)\nx = 2", None),
    "short step, signed store": ("x = 3", "benchmark-master-key"),
    "3-second step, signed store": ("import time\ntime.sleep(3)\nx = 4", "k"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.parse_args()
    print(f"{'case':<30} {'requests':>8}  by kind")
    with KubeServer() as server, tempfile.TemporaryDirectory() as folder:
        kubeconfig = server.write_kubeconfig(Path(folder) / "kubeconfig")
        backend = KubernetesBackend(kubeconfig=str(kubeconfig), context="test")
        for name, (code, key) in CASES.items():
            if key:
                os.environ["JOBRUNNER_SIGNING_KEY"] = key
            session = Session(
                "bench", store=f"{folder}/store-{len(name)}", backend=backend
            )
            session.run("x = 0")
            server.reset_requests()
            result = session.run(code)
            assert result.ok, result.error
            requests = server.requests
            kinds = Counter(
                f"{method} {path.rsplit('/', 1)[-1]}" for method, path in requests
            )
            summary = ", ".join(
                f"{count} {kind}" for kind, count in sorted(kinds.items())
            )
            print(f"{name:<30} {len(requests):>8}  {summary}")
            os.environ.pop("JOBRUNNER_SIGNING_KEY", None)


if __name__ == "__main__":
    main()
