"""The cluster files in examples/kubernetes are valid and grant what is used.

No cluster is needed: every object is parsed by the official client's models
(a misspelt field is dropped by them, so the round trip must give the file
back), and the Role is compared with the API calls of the Kubernetes backend,
both as written in its source and as made against the test API server.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import pytest
import yaml
from kubernetes import client
from kubeserver import KubeServer

from jobrunner import ImagePullFailed, Session, Unschedulable
from jobrunner.backends import kubernetes as backend_module
from jobrunner.backends.kubernetes import KubernetesBackend
from jobrunner.schedule import DRIVER_SERVICE_ACCOUNT

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "kubernetes"
NAMESPACE = "jobrunner"
MODELS = {
    "Namespace": "V1Namespace",
    "ServiceAccount": "V1ServiceAccount",
    "Role": "V1Role",
    "RoleBinding": "V1RoleBinding",
    "Secret": "V1Secret",
    "NetworkPolicy": "V1NetworkPolicy",
    "Deployment": "V1Deployment",
    "Service": "V1Service",
}
# What each client method the backend calls needs: (API group, resource, verb).
# The backend only ever lists pods as a watch.
CLIENT_METHODS = {
    "create_namespaced_job": ("batch", "jobs", "create"),
    "read_namespaced_job": ("batch", "jobs", "get"),
    "delete_namespaced_job": ("batch", "jobs", "delete"),
    "list_namespaced_pod": ("", "pods", "watch"),
    "read_namespaced_pod_log": ("", "pods/log", "get"),
    "list_namespaced_event": ("", "events", "list"),
    "create_namespaced_secret": ("", "secrets", "create"),
    "delete_namespaced_secret": ("", "secrets", "delete"),
}
Permission = tuple[str, str, str]


def _documents() -> list[tuple[str, dict[str, Any]]]:
    return [
        (path.name, document)
        for path in sorted(EXAMPLES.glob("*.yaml"))
        for document in yaml.safe_load_all(path.read_text())
        if document is not None
    ]


def _find(kind: str) -> dict[str, Any]:
    (found,) = [document for _, document in _documents() if document["kind"] == kind]
    return found


@pytest.mark.parametrize(
    ("name", "document"),
    _documents(),
    ids=[f"{name}:{document['kind']}" for name, document in _documents()],
)
def test_each_object_is_a_valid_kubernetes_object(
    name: str, document: dict[str, Any]
) -> None:
    assert {"apiVersion", "kind", "metadata"} <= document.keys(), name
    label = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
    assert re.fullmatch(label, document["metadata"]["name"])
    if document["kind"] != "Namespace":
        assert document["metadata"]["namespace"] == NAMESPACE

    api = client.ApiClient()
    model = api.deserialize(
        json.dumps(document), MODELS[document["kind"]], "application/json"
    )

    assert api.sanitize_for_serialization(model) == document


def _role_permissions() -> set[Permission]:
    return {
        (group, resource, verb)
        for rule in _find("Role")["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }


def test_the_role_grants_exactly_the_calls_in_the_backend_source() -> None:
    source = Path(backend_module.__file__).read_text()
    called = set(re.findall(r"\.(\w+_namespaced_\w+)\b", source))

    assert called <= CLIENT_METHODS.keys(), "a new API call: add it to the Role"
    assert _role_permissions() == {CLIENT_METHODS[name] for name in called}


def _permission(method: str, path: str, query: str) -> Permission:
    found = re.fullmatch(
        r"/(?:api/v1|apis/(?P<group>[^/]+)/[^/]+)/namespaces/[^/]+/"
        r"(?P<resource>[^/]+)(?:/(?P<name>[^/]+)(?:/(?P<sub>[^/]+))?)?",
        path,
    )
    assert found is not None, f"not a namespaced call: {method} {path}"
    resource = found["resource"] + (f"/{found['sub']}" if found["sub"] else "")
    verbs = {"POST": "create", "DELETE": "delete", "PATCH": "patch", "PUT": "update"}
    if method == "GET" and parse_qs(query).get("watch") == ["true"]:
        verb = "watch"
    elif method == "GET":
        verb = "get" if found["name"] else "list"
    else:
        verb = verbs[method]
    return found["group"] or "", resource, verb


@pytest.fixture(scope="module")
def server() -> Iterator[KubeServer]:
    with KubeServer() as running:
        yield running


def test_the_role_allows_every_call_the_backend_makes(
    server: KubeServer,
    tmp_path: Path,
    store_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A signing key makes every step create and delete its own Secret.
    monkeypatch.setenv("JOBRUNNER_SIGNING_KEY", "a-signing-key-for-the-test")
    kubeconfig = str(server.write_kubeconfig(tmp_path / "kubeconfig"))

    def session(name: str, **options: Any) -> Session:
        settings: dict[str, Any] = {"image": "jobrunner-step:test"}
        settings.update(options, namespace=NAMESPACE, schedule_timeout=1.0)
        backend = KubernetesBackend(kubeconfig=kubeconfig, context="test", **settings)
        return Session(name, store=store_url, backend=backend)

    server.reset_requests()
    assert session("ok").run("x = 1").status == "ok"
    server.inject("oom", job="oom-.*", after=0.2)
    oom = session("oom", memory_limit="64Mi").run("import time\ntime.sleep(5)")
    assert oom.status == "killed"
    server.inject("unschedulable", job="unsched-.*")
    with pytest.raises(Unschedulable):
        session("unsched").run("x = 1")
    with pytest.raises(ImagePullFailed):
        session("pull", image="registry.example/does-not-exist:1").run("x = 1")

    made = {_permission(*request) for request in server.requests_with_query}
    assert made <= _role_permissions()
    assert ("", "events", "list") in made and ("", "secrets", "create") in made


def test_the_role_is_bound_to_the_drivers_service_account() -> None:
    account = _find("ServiceAccount")
    binding = _find("RoleBinding")

    assert account["metadata"]["name"] == DRIVER_SERVICE_ACCOUNT
    assert binding["roleRef"]["name"] == _find("Role")["metadata"]["name"]
    assert binding["subjects"] == [
        {
            "kind": "ServiceAccount",
            "name": DRIVER_SERVICE_ACCOUNT,
            "namespace": NAMESPACE,
        }
    ]


def test_the_store_secret_holds_placeholders_only() -> None:
    secret = _find("Secret")

    values = secret["stringData"]
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= values.keys()
    assert all(value.startswith("REPLACE_WITH_") for value in values.values())
    assert "data" not in secret


def test_the_network_policy_isolates_the_step_pods() -> None:
    policy = _find("NetworkPolicy")["spec"]
    selector = policy["podSelector"]["matchLabels"]

    assert selector == {"app.kubernetes.io/managed-by": backend_module.MANAGED_BY}
    assert sorted(policy["policyTypes"]) == ["Egress", "Ingress"]
    assert policy["ingress"] == []
    ports = {
        (port["protocol"], port["port"])
        for rule in policy["egress"]
        for port in rule["ports"]
    }
    assert ports == {("UDP", 53), ("TCP", 53), ("TCP", 9000)}


BUILD_COMMANDS = [
    "docker build -f Dockerfile.step -t jobrunner-step:dev .",
    "kind load docker-image jobrunner-step:dev",
]


def test_the_readme_and_the_demo_use_the_same_build_commands() -> None:
    readme = (EXAMPLES / "README.md").read_text()
    script = (EXAMPLES / "kind-demo.sh").read_text()

    for command in BUILD_COMMANDS:
        assert command in readme and command in script
    assert "step_image/build-local.sh" in readme
    for name in [path.name for path in EXAMPLES.iterdir()]:
        if name != "README.md":
            assert f"`{name}`" in readme, f"the README explains {name}"


def test_the_demo_runs_a_session_through_the_cli_on_s3() -> None:
    script = (EXAMPLES / "kind-demo.sh").read_text()

    assert script.startswith("#!/usr/bin/env bash\n")
    assert "set -euo pipefail" in script and "trap cleanup EXIT" in script
    assert "jobrunner run --backend kubernetes --image" in script
    assert "--store s3://" in script and "--store-option" in script


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="no shellcheck")
def test_the_demo_is_shellcheck_clean() -> None:
    checked = subprocess.run(
        ["shellcheck", str(EXAMPLES / "kind-demo.sh")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert checked.returncode == 0, checked.stdout
