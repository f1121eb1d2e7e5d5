"""Scheduled batch notebooks: a Kubernetes CronJob that runs a notebook's driver.

Scheduling a notebook uploads it (and its parameters) to the store and creates a
batch/v1 CronJob. At each run the CronJob's pod runs the notebook *driver*
(``jobrunner notebook drive``), which reads the notebook from the store and runs
it with the Kubernetes backend, so that every cell is again its own Job; the
executed notebook is written back to the store after every cell::

    schedules/<name>/notebook.ipynb          the notebook, as scheduled
    schedules/<name>/parameters.json         its parameters
    schedules/<name>/runs/<run-id>.ipynb     the executed notebook of each run

A run's id is the UTC time it started (``20240131-020000``) and its session is
the schedule's name followed by that id, so that every run starts from an empty
namespace and its steps can be found by session.

The driver's image is not the step image: it needs jobrunner with its
Kubernetes client (``pip install jobrunner`` on a Python base image, see
``Dockerfile.driver``), and its pod needs a ServiceAccount allowed to create and
delete Jobs and Secrets, and to watch pods and read their logs.
"""

from __future__ import annotations

import json
import logging
import re
import zoneinfo
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import PurePosixPath
from typing import Any, TypeVar

import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from urllib3.exceptions import HTTPError

from jobrunner.backends.base import Backend, OutputCallback
from jobrunner.backends.kubernetes import (
    LABEL_PREFIX,
    MANAGED_BY,
    SCRATCH,
    KubernetesOptions,
    cluster_error,
    container_security_context,
    make_api_client,
    pod_spec,
    pod_volumes,
)
from jobrunner.errors import ClusterUnavailable, InvalidInput
from jobrunner.notebook import (
    NotebookRun,
    read_notebook,
    read_parameters,
    run_notebook,
    write_notebook,
    write_parameters,
)
from jobrunner.store import CheckpointStore

__all__ = [
    "DRIVER_SERVICE_ACCOUNT",
    "NotebookSchedule",
    "ScheduleInfo",
    "build_cronjob",
    "default_schedule_name",
    "delete_schedule",
    "driver_arguments",
    "list_schedules",
    "manifest_yaml",
    "run_scheduled_notebook",
    "schedule_notebook",
    "schedule_session_id",
    "validate_cron",
    "validate_schedule_name",
]

logger = logging.getLogger(__name__)

SCHEDULE_LABEL = f"{LABEL_PREFIX}/schedule"
NOTEBOOK_ANNOTATION = f"{LABEL_PREFIX}/notebook"
NOTEBOOK_FILE = "notebook.ipynb"
PARAMETERS_FILE = "parameters.json"
DRIVER_CONTAINER = "driver"
DRIVER_SERVICE_ACCOUNT = "jobrunner-driver"
DRIVER_COMMAND = ("python", "-m", "jobrunner.cli")
# The CronJob controller names each Job <cronjob>-<minutes>, 11 more characters,
# and a Job's name must fit a 63-character label value.
_MAX_NAME = 52
_NAME = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?\Z")
_RUN_ID = "%Y%m%d-%H%M%S"
# Store options are written into the CronJob's spec, readable by anyone who can
# read it: credentials belong in the --env-secret Secret.
_SECRET_WORDS = ("key", "secret", "token", "password", "credential")

T = TypeVar("T")


# Validating, before any I/O.

_MONTHS = (
    *("jan", "feb", "mar", "apr", "may", "jun"),
    *("jul", "aug", "sep", "oct", "nov", "dec"),
)
_DAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")
_CRON_FIELDS: tuple[tuple[str, int, int, dict[str, int]], ...] = (
    ("minute", 0, 59, {}),
    ("hour", 0, 23, {}),
    ("day-of-month", 1, 31, {}),
    ("month", 1, 12, {name: number for number, name in enumerate(_MONTHS, 1)}),
    ("day-of-week", 0, 7, {name: number for number, name in enumerate(_DAYS)}),
)
_CRON_MACROS = (
    "@yearly",
    "@annually",
    "@monthly",
    "@weekly",
    "@daily",
    "@midnight",
    "@hourly",
)


def validate_cron(expression: str) -> str:
    """Return a cron expression with single spaces, or raise InvalidInput.

    Five fields (minute, hour, day of month, month, day of week), each a comma
    list of ``*``, a value or a range ``a-b``, optionally followed by ``/step``;
    months and days may be named (``jan``, ``mon``). The macros ``@hourly``,
    ``@daily``, ``@weekly``, ``@monthly`` and ``@yearly`` are accepted too.

    Raises:
        InvalidInput: The expression does not have five valid fields.
    """
    fields = expression.split()
    if len(fields) == 1 and fields[0].lower() in _CRON_MACROS:
        return fields[0].lower()
    if len(fields) != 5:
        raise InvalidInput(
            f"the cron expression {expression!r} has {len(fields)} fields, not 5:"
            " minute hour day-of-month month day-of-week"
        )
    for text, (label, low, high, names) in zip(fields, _CRON_FIELDS, strict=True):
        for item in text.split(","):
            problem = _cron_item_problem(item, low, high, names)
            if problem:
                raise InvalidInput(
                    f"the cron expression {expression!r} has an invalid {label}"
                    f" field {text!r}: {problem}"
                )
    return " ".join(fields)


def _cron_item_problem(
    item: str, low: int, high: int, names: dict[str, int]
) -> str | None:
    body, slash, step = item.partition("/")
    if slash and not (step.isdigit() and int(step) > 0):
        return f"the step {step!r} is not a positive number"
    if body in ("*", "?"):
        return None
    bounds = body.split("-")
    if len(bounds) > 2:
        return f"{body!r} is neither a value nor a range"
    values = []
    for bound in bounds:
        value = names.get(bound.lower())
        if value is None and not bound.isdigit():
            return f"{bound!r} is not a number"
        value = int(bound) if value is None else value
        if not low <= value <= high:
            return f"{value} is outside {low}-{high}"
        values.append(value)
    if values != sorted(values):
        return f"the range {body} ends before it starts"
    return None


def validate_schedule_name(name: object) -> str:
    """Return ``name`` if it can name a CronJob, else raise InvalidInput.

    Raises:
        InvalidInput: The name is not a DNS label of at most 52 characters.
    """
    if not isinstance(name, str) or len(name) > _MAX_NAME or not _NAME.match(name):
        raise InvalidInput(
            f"invalid schedule name {name!r}: use 1 to {_MAX_NAME} lowercase"
            " letters, digits and '-', starting and ending with a letter or digit"
        )
    return name


def default_schedule_name(notebook: str) -> str:
    """Return a schedule name made from a notebook's file name.

    ``reports/Sales Q3.ipynb`` gives ``sales-q3``.
    """
    stem = PurePosixPath(notebook.replace("\\", "/")).name.split(".")[0]
    base = re.sub(r"[^a-z0-9]+", "-", stem.lower()).strip("-") or "notebook"
    return base[:_MAX_NAME].rstrip("-")


def _validate_timezone(zone: str | None) -> None:
    if zone is None:
        return
    try:
        zoneinfo.ZoneInfo(zone)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError) as error:
        raise InvalidInput(
            f"unknown time zone {zone!r}: use an IANA name such as Europe/Paris"
        ) from error


def _validate_store_options(options: Mapping[str, Any]) -> None:
    for key in options:
        if any(word in key.lower() for word in _SECRET_WORDS):
            raise InvalidInput(
                f"the store option {key!r} would be written in the CronJob's spec;"
                " put credentials in the --env-secret Secret instead"
            )


# What a schedule is, and its CronJob.


@dataclass(frozen=True)
class NotebookSchedule:
    """A notebook to run on a cron schedule, and how each run runs.

    Every field is checked when the schedule is made, before any I/O.

    Attributes:
        name: The CronJob's name and the schedule's folder in the store.
        cron: When to run: five cron fields, in ``timezone``.
        notebook: The notebook as given (a path or URL), shown when listing.
        store: The store the driver reads and writes; it must be reachable
            from the cluster's pods (an S3 URL, or a folder on ``store_claim``).
        driver_image: An image with jobrunner and its Kubernetes client.
        steps: The options of every cell's Job; its namespace is the CronJob's.
        store_options: Options of the store's filesystem, passed to the driver
            (no credentials: they go in ``steps.env_secret``).
        driver_service_account: The ServiceAccount the driver's pod runs as.
        timezone: An IANA time zone for ``cron`` (default: the controller's).
        cell_timeout: Seconds each cell may run.
        starting_deadline_seconds: How late a missed run may still start.
        successful_jobs_history: How many finished runs' Jobs to keep.
        failed_jobs_history: How many failed runs' Jobs to keep.
    """

    name: str
    cron: str
    notebook: str
    store: str
    driver_image: str
    steps: KubernetesOptions = field(default_factory=KubernetesOptions)
    store_options: dict[str, Any] = field(default_factory=dict)
    driver_service_account: str = DRIVER_SERVICE_ACCOUNT
    timezone: str | None = None
    cell_timeout: float | None = None
    starting_deadline_seconds: int = 300
    successful_jobs_history: int = 3
    failed_jobs_history: int = 3

    def __post_init__(self) -> None:
        validate_schedule_name(self.name)
        object.__setattr__(self, "cron", validate_cron(self.cron))
        _validate_timezone(self.timezone)
        _validate_store_options(self.store_options)
        if not self.driver_image:
            raise InvalidInput(
                "no driver image: pass --driver-image or set JOBRUNNER_DRIVER_IMAGE"
            )

    @property
    def namespace(self) -> str:
        """The namespace of the CronJob, its driver and every cell's Job."""
        return self.steps.namespace


def _labels(name: str) -> dict[str, str]:
    return {"app.kubernetes.io/managed-by": MANAGED_BY, SCHEDULE_LABEL: name}


def driver_arguments(schedule: NotebookSchedule) -> list[str]:
    """Return the arguments of ``jobrunner`` that the driver's pod runs."""
    steps = schedule.steps
    arguments = ["notebook", "drive", "--schedule", schedule.name]
    arguments += ["--store", schedule.store]
    for key, value in sorted(schedule.store_options.items()):
        arguments += ["--store-option", f"{key}={_option_text(value)}"]
    arguments += ["--backend", "kubernetes", "--namespace", steps.namespace]
    arguments += ["--image", steps.image]
    flags = {
        "--memory": steps.memory_limit,
        "--cpu": steps.cpu_limit,
        "--gpus": str(steps.gpus) if steps.gpus else None,
        "--env-secret": steps.env_secret,
        "--service-account": steps.service_account,
        "--timeout": str(schedule.cell_timeout) if schedule.cell_timeout else None,
    }
    for flag, value in flags.items():
        if value:
            arguments += [flag, value]
    for key, value in sorted(steps.node_selector.items()):
        arguments += ["--node-selector", f"{key}={value}"]
    if steps.retry_oom:
        arguments.append("--retry-oom")
    return arguments


def _option_text(value: Any) -> str:
    """The text --store-option reads back as ``value`` (it tries JSON first)."""
    if isinstance(value, str):
        try:
            json.loads(value)
        except ValueError:
            return value
    return json.dumps(value)


def _driver_pod(schedule: NotebookSchedule) -> client.V1PodSpec:
    steps = schedule.steps
    local_store = None if "://" in schedule.store else schedule.store
    volumes, mounts = pod_volumes(steps, local_store)
    env_from = None
    if steps.env_secret:
        source = client.V1SecretEnvSource(name=steps.env_secret)
        env_from = [client.V1EnvFromSource(secret_ref=source)]
    container = client.V1Container(
        name=DRIVER_CONTAINER,
        image=schedule.driver_image,
        image_pull_policy=steps.image_pull_policy,
        command=list(DRIVER_COMMAND),
        args=driver_arguments(schedule),
        env=[
            client.V1EnvVar(name="HOME", value=SCRATCH),
            # The driver's log is the cells' output: show it as it comes.
            client.V1EnvVar(name="PYTHONUNBUFFERED", value="1"),
        ],
        env_from=env_from,
        resources=client.V1ResourceRequirements(
            requests={"cpu": "100m", "memory": "256Mi"}, limits={"memory": "1Gi"}
        ),
        security_context=container_security_context(),
        volume_mounts=mounts,
        working_dir=SCRATCH,
    )
    # The driver talks to the API server, so its token is mounted; it needs no
    # GPU node, so the steps' node selector and tolerations are not its own.
    driver = replace(
        steps,
        service_account=schedule.driver_service_account,
        mount_service_account_token=True,
        node_selector={},
        tolerations=(),
    )
    return pod_spec(driver, container, volumes)


def build_cronjob(schedule: NotebookSchedule) -> client.V1CronJob:
    """Return the CronJob that runs a schedule's driver.

    One run at a time (``concurrencyPolicy: Forbid``), a driver that is not
    retried (a retry would be a new run, in a new session), a hardened pod.
    """
    labels = _labels(schedule.name)
    job = client.V1JobSpec(
        backoff_limit=0,
        template=client.V1PodTemplateSpec(
            metadata=client.V1ObjectMeta(labels=labels),
            spec=_driver_pod(schedule),
        ),
    )
    return client.V1CronJob(
        api_version="batch/v1",
        kind="CronJob",
        metadata=client.V1ObjectMeta(
            name=schedule.name,
            namespace=schedule.namespace,
            labels=labels,
            annotations={NOTEBOOK_ANNOTATION: schedule.notebook},
        ),
        spec=client.V1CronJobSpec(
            schedule=schedule.cron,
            time_zone=schedule.timezone,
            concurrency_policy="Forbid",
            starting_deadline_seconds=schedule.starting_deadline_seconds,
            successful_jobs_history_limit=schedule.successful_jobs_history,
            failed_jobs_history_limit=schedule.failed_jobs_history,
            suspend=False,
            job_template=client.V1JobTemplateSpec(
                metadata=client.V1ObjectMeta(labels=labels), spec=job
            ),
        ),
    )


def manifest_yaml(obj: Any) -> str:
    """Return a client model as the YAML ``kubectl apply -f`` takes."""
    data = client.ApiClient().sanitize_for_serialization(obj)
    return str(yaml.safe_dump(data, sort_keys=False))


# Talking to the cluster.


def _call(action: str, request: Callable[[], T], api: client.ApiClient) -> T:
    try:
        return request()
    except ApiException as error:
        raise cluster_error(error, action) from error
    except HTTPError as error:
        raise ClusterUnavailable(
            f"cannot reach the Kubernetes API server at {api.configuration.host}:"
            f" {error}"
        ) from error


def schedule_notebook(
    schedule: NotebookSchedule,
    api: client.ApiClient | None = None,
    *,
    parameters: Mapping[str, Any] | None = None,
    dry_run: bool = False,
) -> client.V1CronJob:
    """Upload a notebook to the store and create the CronJob that runs it.

    Args:
        schedule: What to run, when and how.
        api: A client of the cluster (default: from ``$KUBECONFIG``,
            ``~/.kube/config`` or the pod's ServiceAccount).
        parameters: Values injected into the notebook at every run.
        dry_run: Build the CronJob and check the notebook, but create and
            upload nothing.

    Returns:
        The CronJob, as built (with ``dry_run``) or as the cluster created it.

    Raises:
        InvalidInput: The notebook cannot be read, a parameter is not JSON,
            or a schedule of that name exists.
        ClusterUnavailable: The API server cannot be reached or refused.
        StoreUnavailable: The store cannot be written.
    """
    notebook = read_notebook(schedule.notebook)
    parameters = dict(parameters or {})
    _check_json(parameters)
    cronjob = build_cronjob(schedule)
    if dry_run:
        return cronjob

    api = api or make_api_client(None, None)
    batch = client.BatchV1Api(api)
    try:
        created = batch.create_namespaced_cron_job(schedule.namespace, cronjob)
    except ApiException as error:
        if error.status == 409:
            raise InvalidInput(
                f"a schedule named {schedule.name!r} exists in namespace"
                f" {schedule.namespace!r}; unschedule it first or choose another"
                " --name"
            ) from error
        raise cluster_error(error, "create the schedule's CronJob") from error
    except HTTPError as error:
        raise ClusterUnavailable(
            f"cannot reach the Kubernetes API server at {api.configuration.host}:"
            f" {error}"
        ) from error
    logger.info("created CronJob %s/%s", schedule.namespace, schedule.name)

    try:
        _upload(schedule, notebook, parameters)
    except BaseException:
        # A CronJob without its notebook would fail at every run.
        _delete(api, schedule.name, schedule.namespace)
        raise
    return created


def _check_json(parameters: Mapping[str, Any]) -> None:
    try:
        json.dumps(parameters)
    except (TypeError, ValueError) as error:
        raise InvalidInput(f"the parameters are not JSON values: {error}") from error


def _upload(
    schedule: NotebookSchedule, notebook: Any, parameters: dict[str, Any]
) -> None:
    store = CheckpointStore(schedule.store, options=schedule.store_options)
    options = store.options
    write_notebook(notebook, store.schedule_url(schedule.name, NOTEBOOK_FILE), options)
    target = store.schedule_url(schedule.name, PARAMETERS_FILE)
    write_parameters(parameters, target, options)
    logger.info("uploaded the notebook of schedule %s to %s", schedule.name, store)


@dataclass(frozen=True)
class ScheduleInfo:
    """A scheduled notebook, as its CronJob says.

    Attributes:
        name: The schedule's name.
        cron: Its cron expression.
        notebook: The notebook it was made from.
        namespace: The CronJob's namespace.
        timezone: The cron expression's time zone, if set.
        suspended: True when the CronJob is suspended.
        last_schedule: When a run last started, if one did.
    """

    name: str
    cron: str
    notebook: str
    namespace: str
    timezone: str | None = None
    suspended: bool = False
    last_schedule: datetime | None = None

    def to_dict(self) -> dict[str, Any]:
        """Return the schedule as JSON-ready data."""
        last = self.last_schedule.isoformat() if self.last_schedule else None
        return {
            "name": self.name,
            "cron": self.cron,
            "notebook": self.notebook,
            "namespace": self.namespace,
            "timezone": self.timezone,
            "suspended": self.suspended,
            "last_schedule": last,
        }


def list_schedules(api: client.ApiClient, namespace: str) -> list[ScheduleInfo]:
    """Return the notebook schedules of a namespace, sorted by name.

    Raises:
        ClusterUnavailable: The API server cannot be reached or refused.
    """
    selector = f"app.kubernetes.io/managed-by={MANAGED_BY},{SCHEDULE_LABEL}"
    found = _call(
        "list the schedules' CronJobs",
        lambda: client.BatchV1Api(api).list_namespaced_cron_job(
            namespace, label_selector=selector
        ),
        api,
    )
    return sorted((_info(item) for item in found.items), key=lambda s: s.name)


def _info(cronjob: Any) -> ScheduleInfo:
    metadata, spec, status = cronjob.metadata, cronjob.spec, cronjob.status
    return ScheduleInfo(
        name=metadata.name,
        cron=spec.schedule,
        notebook=(metadata.annotations or {}).get(NOTEBOOK_ANNOTATION, ""),
        namespace=metadata.namespace,
        timezone=spec.time_zone,
        suspended=bool(spec.suspend),
        last_schedule=status.last_schedule_time if status else None,
    )


def delete_schedule(api: client.ApiClient, name: str, namespace: str) -> None:
    """Delete a schedule's CronJob and, in the background, its Jobs and pods.

    The notebook and the runs' notebooks stay in the store.

    Raises:
        InvalidInput: No schedule of that name, or the CronJob of that name
            is not jobrunner's.
        ClusterUnavailable: The API server cannot be reached or refused.
    """
    validate_schedule_name(name)
    batch = client.BatchV1Api(api)
    try:
        cronjob = batch.read_namespaced_cron_job(name, namespace)
    except ApiException as error:
        if error.status == 404:
            raise InvalidInput(
                f"no schedule named {name!r} in namespace {namespace!r}"
            ) from error
        raise cluster_error(error, f"read the CronJob {name}") from error
    if (cronjob.metadata.labels or {}).get(SCHEDULE_LABEL) != name:
        raise InvalidInput(
            f"the CronJob {name!r} in namespace {namespace!r} is not a jobrunner"
            " schedule; delete it with kubectl if you mean to"
        )
    _delete(api, name, namespace)


def _delete(api: client.ApiClient, name: str, namespace: str) -> None:
    _call(
        f"delete the CronJob {name}",
        lambda: client.BatchV1Api(api).delete_namespaced_cron_job(
            name, namespace, propagation_policy="Background"
        ),
        api,
    )
    logger.info("deleted CronJob %s/%s and its Jobs", namespace, name)


# The driver: what the CronJob's pod runs.


def schedule_session_id(name: str, when: datetime) -> str:
    """Return the session id of a schedule's run: its name, then the UTC time.

    ``nightly`` at 2024-01-31 02:00:00 UTC gives ``nightly-20240131-020000``.
    """
    stamp = when.astimezone(timezone.utc).strftime(_RUN_ID)
    return f"{name[: 62 - len(stamp)].rstrip('-')}-{stamp}"


def run_scheduled_notebook(
    store: CheckpointStore,
    name: str,
    backend: Backend,
    *,
    when: datetime | None = None,
    timeout: float | None = None,
    on_output: OutputCallback | None = None,
) -> NotebookRun:
    """Run one run of a schedule: the driver's work.

    Reads the schedule's notebook and parameters from the store, runs the
    notebook in a new session and writes the executed notebook to
    ``schedules/<name>/runs/<run-id>.ipynb`` in the store after every cell.

    Args:
        store: The store the notebook was uploaded to.
        name: The schedule's name.
        backend: Where the cells run (the Kubernetes backend, in a cluster).
        when: The run's time (default: now); it names the run and its session.
        timeout: Seconds each cell may run.
        on_output: Called with ``("stdout" | "stderr", text)`` as a cell writes.

    Raises:
        InvalidInput: The name is invalid, or the store holds no such schedule.
        StoreUnavailable: The store cannot be used.
        BackendError: The backend could not run a cell.
    """
    validate_schedule_name(name)
    when = when or datetime.now(timezone.utc)
    run_id = when.astimezone(timezone.utc).strftime(_RUN_ID)
    options = store.options
    parameters = read_parameters(store.schedule_url(name, PARAMETERS_FILE), options)
    output = store.schedule_url(name, f"runs/{run_id}.ipynb")
    session = schedule_session_id(name, when)
    logger.info("run %s of schedule %s: session %s", run_id, name, session)
    return run_notebook(
        store.schedule_url(name, NOTEBOOK_FILE),
        parameters=parameters,
        session=session,
        output=output,
        store=store,
        backend=backend,
        timeout=timeout,
        storage_options=options,
        on_output=on_output,
    )
