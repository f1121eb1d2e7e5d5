"""Scheduled notebooks: the CronJob, its listing and deletion, and the driver,
against the test API server, whose kubelet runs pods as local processes."""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import nbformat
import pytest
import yaml
from kubernetes import client
from kubeserver import KubeServer
from typer.testing import CliRunner

from jobrunner.backends.kubernetes import make_api_client
from jobrunner.cli import app
from jobrunner.errors import InvalidInput
from jobrunner.schedule import (
    NotebookSchedule,
    build_cronjob,
    default_schedule_name,
    delete_schedule,
    list_schedules,
    schedule_notebook,
    schedule_session_id,
    validate_cron,
    validate_schedule_name,
)
from jobrunner.store import validate_session_id

# nbformat has no annotations.
_read_notebook: Any = nbformat.read
STEP_IMAGE = "jobrunner-step:test"
DRIVER_IMAGE = "jobrunner-driver:test"
NOTEBOOK = """\
# %% tags=["parameters"]
n = 2

# %%
print("n is", n)
total = n * 21

# %%
total
"""


@pytest.fixture(scope="module")
def kubeconfig_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("kube") / "config"


@pytest.fixture(scope="module")
def server(kubeconfig_path: Path) -> Iterator[KubeServer]:
    # The driver's pod finds the API server as any client outside a cluster:
    # through $KUBECONFIG.
    with KubeServer(extra_env={"KUBECONFIG": str(kubeconfig_path)}) as running:
        running.write_kubeconfig(kubeconfig_path, context="test")
        yield running


@pytest.fixture
def kubeconfig(server: KubeServer, kubeconfig_path: Path) -> str:
    return str(kubeconfig_path)


@pytest.fixture
def api(kubeconfig: str) -> client.ApiClient:
    return make_api_client(kubeconfig, "test")


@pytest.fixture
def notebook(tmp_path: Path) -> str:
    path = tmp_path / "report.py"
    path.write_text(NOTEBOOK)
    return str(path)


@pytest.fixture
def name(api: client.ApiClient) -> Iterator[str]:
    """A unique schedule name; its CronJob is deleted after the test."""
    unique = f"nightly-{uuid.uuid4().hex[:6]}"
    yield unique
    batch = client.BatchV1Api(api)
    if any(item.metadata.name == unique for item in _cronjobs(api)):
        batch.delete_namespaced_cron_job(unique, "default")


def _cronjobs(api: client.ApiClient) -> list[Any]:
    return list(client.BatchV1Api(api).list_namespaced_cron_job("default").items)


def _stored(server: KubeServer, name: str) -> dict[str, Any]:
    (found,) = [c for c in server.objects("cronjobs") if c["metadata"]["name"] == name]
    return found


def _schedule_arguments(
    notebook: str, name: str, store_url: str, kubeconfig: str
) -> list[str]:
    return [
        "notebook",
        "schedule",
        notebook,
        "--cron",
        "0 2 * * *",
        "-p",
        "n=3",
        "--name",
        name,
        "--store",
        store_url,
        "--driver-image",
        DRIVER_IMAGE,
        "--image",
        STEP_IMAGE,
        "--memory",
        "512Mi",
        "--timezone",
        "Europe/Paris",
        "--kubeconfig",
        kubeconfig,
        "--context",
        "test",
    ]


def test_schedule_creates_a_hardened_cronjob_and_uploads_the_notebook(
    notebook: str, name: str, store_url: str, kubeconfig: str, server: KubeServer
) -> None:
    arguments = _schedule_arguments(notebook, name, store_url, kubeconfig)
    result = CliRunner().invoke(app, arguments)

    assert result.exit_code == 0, result.output
    assert f"scheduled {name} (0 2 * * *)" in " ".join(result.stderr.split())
    cronjob = _stored(server, name)
    assert cronjob["metadata"]["labels"] == {
        "app.kubernetes.io/managed-by": "jobrunner",
        "jobrunner.io/schedule": name,
    }
    assert cronjob["metadata"]["annotations"]["jobrunner.io/notebook"] == notebook
    spec = cronjob["spec"]
    assert spec["schedule"] == "0 2 * * *"
    assert spec["timeZone"] == "Europe/Paris"
    assert spec["concurrencyPolicy"] == "Forbid"
    assert (spec["successfulJobsHistoryLimit"], spec["failedJobsHistoryLimit"]) == (
        3,
        3,
    )
    assert spec["startingDeadlineSeconds"] == 300
    job = spec["jobTemplate"]["spec"]
    assert job["backoffLimit"] == 0
    pod = job["template"]["spec"]
    assert job["template"]["metadata"]["labels"]["jobrunner.io/schedule"] == name
    assert pod["restartPolicy"] == "Never"
    assert pod["serviceAccountName"] == "jobrunner-driver"
    assert pod["automountServiceAccountToken"] is True, "the driver calls the API"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert {"name": "scratch", "emptyDir": {}} in pod["volumes"]
    (container,) = pod["containers"]
    assert container["image"] == DRIVER_IMAGE
    assert container["command"] == ["python", "-m", "jobrunner.cli"]
    absolute = str(Path(store_url).resolve())
    assert container["args"] == [
        *("notebook", "drive", "--schedule", name, "--store", absolute),
        *("--backend", "kubernetes", "--namespace", "default"),
        *("--image", STEP_IMAGE, "--memory", "512Mi"),
    ]
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert {"name": "scratch", "mountPath": "/tmp"} in container["volumeMounts"]

    folder = Path(store_url) / "schedules" / name
    uploaded = _read_notebook(folder / "notebook.ipynb", as_version=4)
    assert [cell.source for cell in uploaded.cells][
        1
    ] == 'print("n is", n)\ntotal = n * 21'
    assert json.loads((folder / "parameters.json").read_text()) == {"n": 3}


def test_dry_run_prints_the_same_cronjob_and_creates_nothing(
    notebook: str, name: str, store_url: str, kubeconfig: str, server: KubeServer
) -> None:
    arguments = _schedule_arguments(notebook, name, store_url, kubeconfig)
    server.reset_requests()
    dry = CliRunner().invoke(app, [*arguments, "--dry-run"])

    assert dry.exit_code == 0, dry.output
    assert server.requests == []
    assert not (Path(store_url) / "schedules").exists()
    printed = yaml.safe_load(dry.stdout)
    assert (printed["apiVersion"], printed["kind"]) == ("batch/v1", "CronJob")

    assert CliRunner().invoke(app, arguments).exit_code == 0
    created = _stored(server, name)
    assert created["metadata"]["labels"] == printed["metadata"]["labels"]
    for key in ("schedule", "timeZone", "concurrencyPolicy", "startingDeadlineSeconds"):
        assert created["spec"][key] == printed["spec"][key]
    created_pod = created["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    printed_pod = printed["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    for key in ("securityContext", "serviceAccountName", "volumes"):
        assert created_pod[key] == printed_pod[key]
    (created_container,) = created_pod["containers"]
    (printed_container,) = printed_pod["containers"]
    # The server adds defaults (terminationMessagePath...), never changes ours.
    assert printed_container.items() <= created_container.items()


def test_schedules_are_listed_and_unscheduled(
    notebook: str, name: str, store_url: str, kubeconfig: str, server: KubeServer
) -> None:
    arguments = _schedule_arguments(notebook, name, store_url, kubeconfig)
    assert CliRunner().invoke(app, arguments).exit_code == 0
    cluster = ["--kubeconfig", kubeconfig, "--context", "test"]

    listed = CliRunner().invoke(app, ["notebook", "schedules", "--json", *cluster])
    assert listed.exit_code == 0, listed.output
    (mine,) = [item for item in json.loads(listed.stdout) if item["name"] == name]
    assert mine == {
        "name": name,
        "cron": "0 2 * * *",
        "notebook": notebook,
        "namespace": "default",
        "timezone": "Europe/Paris",
        "suspended": False,
        "last_schedule": None,
    }
    table = CliRunner().invoke(app, ["notebook", "schedules", *cluster])
    assert table.exit_code == 0 and name in table.stdout

    gone = CliRunner().invoke(app, ["notebook", "unschedule", name, *cluster])
    assert gone.exit_code == 0, gone.output
    said = " ".join(gone.stderr.split())
    assert f"deleted the CronJob default/{name} and its Jobs" in said
    assert name not in {c["metadata"]["name"] for c in server.objects("cronjobs")}
    deletes = [q for m, p, q in server.requests_with_query if m == "DELETE"]
    assert "propagationPolicy=Background" in deletes[-1]
    again = CliRunner().invoke(app, ["notebook", "unschedule", name, *cluster])
    assert again.exit_code == 2
    assert f"no schedule named '{name}'" in again.stderr


def test_a_cronjob_that_is_not_a_schedule_is_not_deleted(
    api: client.ApiClient, name: str
) -> None:
    plan = NotebookSchedule(name, "0 2 * * *", "x.ipynb", "/store", DRIVER_IMAGE)
    foreign = build_cronjob(plan)
    foreign.metadata.labels = {"team": "other"}
    client.BatchV1Api(api).create_namespaced_cron_job("default", foreign)

    with pytest.raises(InvalidInput, match="is not a jobrunner schedule"):
        delete_schedule(api, name, "default")
    assert name not in {s.name for s in list_schedules(api, "default")}
    assert name in {item.metadata.name for item in _cronjobs(api)}


@pytest.mark.parametrize(
    ("cron", "problem"),
    [
        ("0 2 * *", "has 4 fields, not 5"),
        ("0 2 * * * *", "has 6 fields, not 5"),
        ("61 * * * *", "minute field '61': 61 is outside 0-59"),
        ("* 24 * * *", "hour field '24': 24 is outside 0-23"),
        ("* * 0 * *", "day-of-month field '0': 0 is outside 1-31"),
        ("* * * 13 *", "month field '13'"),
        ("* * * * 8", "day-of-week field '8'"),
        ("5-3 * * * *", "the range 5-3 ends before it starts"),
        ("*/0 * * * *", "the step '0' is not a positive number"),
        ("x * * * *", "'x' is not a number"),
        ("* * * foo *", "'foo' is not a number"),
    ],
)
def test_invalid_cron_expressions_are_refused_before_any_request(
    cron: str,
    problem: str,
    notebook: str,
    store_url: str,
    kubeconfig: str,
    server: KubeServer,
) -> None:
    arguments = _schedule_arguments(notebook, "bad-cron", store_url, kubeconfig)
    arguments[arguments.index("0 2 * * *")] = cron
    server.reset_requests()
    result = CliRunner().invoke(app, arguments)

    assert result.exit_code == 2
    assert f"the cron expression {cron!r}" in " ".join(result.stderr.split())
    assert problem in " ".join(result.stderr.split())
    assert server.requests == []
    with pytest.raises(InvalidInput, match=re.escape(problem)):
        validate_cron(cron)


@pytest.mark.parametrize(
    "cron",
    ["0 2 * * *", "*/15 9-17 * * mon-fri", "0 0 1 jan,jul *", "0 0 * * 7", "@daily"],
)
def test_valid_cron_expressions_are_accepted(cron: str) -> None:
    assert validate_cron(f" {cron} ") == cron


@pytest.mark.parametrize("bad", ["Nightly", "-nightly", "night_ly", "a" * 53, ""])
def test_invalid_schedule_names_are_refused(
    bad: str, notebook: str, store_url: str, kubeconfig: str, server: KubeServer
) -> None:
    with pytest.raises(InvalidInput, match="invalid schedule name"):
        validate_schedule_name(bad)
    arguments = _schedule_arguments(notebook, bad, store_url, kubeconfig)
    server.reset_requests()
    result = CliRunner().invoke(app, arguments)
    assert result.exit_code == 2
    assert "invalid schedule name" in result.stderr
    assert server.requests == []


def test_a_driver_image_is_required(notebook: str, store_url: str) -> None:
    arguments = _schedule_arguments(notebook, "x", store_url, "unused")
    at = arguments.index("--driver-image")
    del arguments[at : at + 2]
    result = CliRunner().invoke(app, [*arguments, "--dry-run"])
    assert result.exit_code == 2
    assert "JOBRUNNER_DRIVER_IMAGE" in result.stderr


def test_credentials_are_kept_out_of_the_cronjob() -> None:
    with pytest.raises(InvalidInput, match=r"'secret'.*--env-secret"):
        NotebookSchedule(
            "x",
            "@daily",
            "x.ipynb",
            "s3://b",
            DRIVER_IMAGE,
            store_options={"secret": "s"},
        )


def test_run_session_ids_are_dns_labels() -> None:
    when = datetime(2024, 1, 31, 2, 0, tzinfo=timezone.utc)
    assert schedule_session_id("nightly", when) == "nightly-20240131-020000"
    longest = schedule_session_id("a" * 51 + "-b", when)
    assert validate_session_id(longest) == longest
    assert default_schedule_name("reports/Sales Q3.ipynb") == "sales-q3"


def test_the_driver_runs_the_notebook_from_the_store_cell_by_cell(
    notebook: str,
    name: str,
    store_url: str,
    api: client.ApiClient,
    server: KubeServer,
) -> None:
    plan = NotebookSchedule(
        name,
        "0 2 * * *",
        notebook,
        str(Path(store_url).resolve()),
        DRIVER_IMAGE,
        steps=_step_options(),
    )
    cronjob = schedule_notebook(plan, api, parameters={"n": 3})
    # Run it now, as the CronJob controller would (kubectl create job --from).
    template = cronjob.spec.job_template
    job = client.V1Job(
        api_version="batch/v1",
        kind="Job",
        metadata=client.V1ObjectMeta(
            name=f"{name}-manual", labels=template.metadata.labels
        ),
        spec=template.spec,
    )
    client.BatchV1Api(api).create_namespaced_job("default", job)

    driver = _wait_for_job(server, f"{name}-manual")
    runs = Path(store_url) / "schedules" / name / "runs"
    (output,) = runs.iterdir()
    log = _driver_log(server, f"{name}-manual")
    assert driver["status"].get("succeeded") == 1, log
    assert re.fullmatch(r"\d{8}-\d{6}\.ipynb", output.name)
    executed = _read_notebook(output, as_version=4)
    record = executed.metadata["jobrunner"]
    assert record["status"] == "completed"
    assert record["parameters"] == {"n": 3}
    assert record["session"] == f"{name}-{output.name.removesuffix('.ipynb')}"
    code = [cell for cell in executed.cells if cell.cell_type == "code"]
    assert code[2].outputs[0]["text"] == "n is 3\n"
    assert code[3].outputs[0]["data"]["text/plain"] == "63"
    steps = [
        j
        for j in server.jobs()
        if j["metadata"]["labels"].get("jobrunner.io/session") == record["session"]
    ]
    assert len(steps) == 4, "each code cell (parameters included) ran as its own Job"
    assert "n is 3" in log


def _step_options() -> Any:
    from jobrunner.backends.kubernetes import KubernetesOptions

    return KubernetesOptions(image=STEP_IMAGE)


def _wait_for_job(server: KubeServer, name: str) -> dict[str, Any]:
    deadline = time.monotonic() + 50
    while time.monotonic() < deadline:
        (job,) = [j for j in server.jobs() if j["metadata"]["name"] == name]
        status = job.get("status") or {}
        if status.get("succeeded") or status.get("failed"):
            return job
        time.sleep(0.2)
    raise AssertionError(f"the driver's Job {name} did not finish in 50 s")


def _driver_log(server: KubeServer, job: str) -> str:
    (pod,) = [
        p for p in server.pods() if p["metadata"]["labels"].get("job-name") == job
    ]
    return server.pod_log("default", pod["metadata"]["name"]).decode()


def test_notebook_run_takes_the_backend_options(
    notebook: str, store_url: str, kubeconfig: str, server: KubeServer, tmp_path: Path
) -> None:
    session = f"nb-{uuid.uuid4().hex[:6]}"
    result = CliRunner().invoke(
        app,
        [
            *("notebook", "run", notebook, "--session", session),
            *("--output", str(tmp_path / "out.ipynb"), "--store", store_url),
            *("--backend", "kubernetes", "--image", STEP_IMAGE, "--memory", "256Mi"),
            *("--kubeconfig", kubeconfig, "--context", "test"),
        ],
    )

    assert result.exit_code == 0, result.output
    jobs = [
        j
        for j in server.jobs()
        if j["metadata"]["labels"].get("jobrunner.io/session") == session
    ]
    assert len(jobs) == 3, "one Job per code cell"
    (container,) = jobs[0]["spec"]["template"]["spec"]["containers"]
    assert container["resources"]["limits"] == {"memory": "256Mi"}
