"""Validation and defaulting of the objects this server stores.

The rules and messages follow the real API server's, so that a manifest this
server accepts is one a cluster would accept too.
"""

from __future__ import annotations

import base64
import binascii
import re
import zoneinfo
from typing import Any

from ._errors import Invalid
from ._faults import FAULT_ANNOTATION, annotation_problem

_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_SUBDOMAIN = re.compile(rf"^{_LABEL}(\.{_LABEL})*$")
_DNS_LABEL = re.compile(rf"^{_LABEL}$")
_QUALIFIED_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
_ENV_NAME = re.compile(r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")
_SECRET_KEY = re.compile(r"^[-._a-zA-Z0-9]+$")
_QUANTITY = re.compile(
    r"^([+-]?(?:\d+(?:\.\d*)?|\.\d+))"
    r"(Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|M|G|T|P|E|[eE][+-]?\d+)?$"
)
_SUFFIXES = {
    "Ki": 2.0**10,
    "Mi": 2.0**20,
    "Gi": 2.0**30,
    "Ti": 2.0**40,
    "Pi": 2.0**50,
    "Ei": 2.0**60,
    "n": 1e-9,
    "u": 1e-6,
    "m": 1e-3,
    "k": 1e3,
    "M": 1e6,
    "G": 1e9,
    "T": 1e12,
    "P": 1e15,
    "E": 1e18,
}

SUBDOMAIN_MESSAGE = (
    "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric "
    "characters, '-' or '.', and must start and end with an alphanumeric character "
    "(e.g. 'example.com', regex used for validation is "
    "'[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')"
)
DNS_LABEL_MESSAGE = (
    "a lowercase RFC 1123 label must consist of lower case alphanumeric characters "
    "or '-', and must start and end with an alphanumeric character (e.g. 'my-name', "
    " or '123-abc', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')"
)
_LABEL_VALUE_MESSAGE = (
    "a valid label must be an empty string or consist of alphanumeric characters, "
    "'-', '_' or '.', and must start and end with an alphanumeric character (e.g. "
    "'MyValue',  or 'my_value',  or '12345', regex used for validation is "
    "'(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?')"
)
_QUALIFIED_NAME_MESSAGE = (
    "name part must consist of alphanumeric characters, '-', '_' or '.', and must "
    "start and end with an alphanumeric character (e.g. 'MyName',  or 'my.name',  "
    "or '123-abc', regex used for validation is "
    "'([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]')"
)
_CRON_MACROS = {
    "@yearly",
    "@annually",
    "@monthly",
    "@weekly",
    "@daily",
    "@midnight",
    "@hourly",
}
_CRON_RANGES = [(0, 59), (0, 23), (1, 31), (1, 12), (0, 6)]
_MONTHS = [
    "JAN",
    "FEB",
    "MAR",
    "APR",
    "MAY",
    "JUN",
    "JUL",
    "AUG",
    "SEP",
    "OCT",
    "NOV",
    "DEC",
]
_DAYS = ("SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT")
_CRON_NAMES: list[dict[str, int]] = [
    {},
    {},
    {},
    {month: index + 1 for index, month in enumerate(_MONTHS)},
    {day: index for index, day in enumerate(_DAYS)},
]


class Causes:
    """Collects broken rules for one object, then raises them all at once."""

    def __init__(self) -> None:
        self.causes: list[dict[str, str]] = []

    def invalid(self, field: str, value: Any, detail: str) -> None:
        shown = value if isinstance(value, str) else repr(value)
        message = f'Invalid value: "{shown}": {detail}'
        self.causes.append(
            {"reason": "FieldValueInvalid", "message": message, "field": field}
        )

    def required(self, field: str) -> None:
        self.causes.append(
            {
                "reason": "FieldValueRequired",
                "message": "Required value",
                "field": field,
            }
        )

    def unsupported(self, field: str, value: Any, supported: list[str]) -> None:
        listed = ", ".join(f'"{choice}"' for choice in supported)
        message = f'Unsupported value: "{value}": supported values: {listed}'
        self.causes.append(
            {"reason": "FieldValueNotSupported", "message": message, "field": field}
        )

    def duplicate(self, field: str, value: Any) -> None:
        message = f'Duplicate value: "{value}"'
        self.causes.append(
            {"reason": "FieldValueDuplicate", "message": message, "field": field}
        )

    def raise_if_any(self, kind: str, group: str, name: str) -> None:
        if self.causes:
            raise Invalid(kind, group, name, self.causes)


def subdomain_problem(name: str, max_length: int = 253) -> str | None:
    """Say why ``name`` is not a DNS-1123 subdomain, or return None."""
    if len(name) > max_length:
        return f"must be no more than {max_length} characters"
    if not _SUBDOMAIN.match(name):
        return SUBDOMAIN_MESSAGE
    return None


def dns_label_problem(name: str) -> str | None:
    """Say why ``name`` is not a DNS-1123 label, or return None."""
    if len(name) > 63:
        return "must be no more than 63 characters"
    if not _DNS_LABEL.match(name):
        return DNS_LABEL_MESSAGE
    return None


def label_key_problem(key: str) -> str | None:
    """Say why ``key`` is not a valid label or annotation key, or return None."""
    prefix, _, name = key.rpartition("/")
    if "/" in key and (not prefix or subdomain_problem(prefix)):
        return "prefix part " + (subdomain_problem(prefix) or "must be non-empty")
    if not name:
        return "name part must be non-empty"
    if len(name) > 63:
        return "name part must be no more than 63 characters"
    if not _QUALIFIED_NAME.match(name):
        return _QUALIFIED_NAME_MESSAGE
    return None


def label_value_problem(value: str) -> str | None:
    """Say why ``value`` is not a valid label value, or return None."""
    if len(value) > 63:
        return "must be no more than 63 characters"
    if not _LABEL_VALUE.match(value):
        return _LABEL_VALUE_MESSAGE
    return None


def parse_quantity(text: str) -> float | None:
    """Return a resource quantity's value (``"512Mi"`` -> bytes), or None."""
    found = _QUANTITY.match(str(text))
    if not found:
        return None
    number, suffix = found.groups()
    if suffix and suffix[0] in "eE":
        return float(number + suffix)
    return float(number) * _SUFFIXES.get(suffix or "", 1.0)


def _check_string_map(
    causes: Causes, field: str, values: Any, check_values: bool
) -> None:
    if values is None:
        return
    if not isinstance(values, dict):
        causes.invalid(field, values, "must be a map of strings")
        return
    for key, value in values.items():
        problem = label_key_problem(key)
        if problem:
            causes.invalid(field, key, problem)
        if not isinstance(value, str):
            causes.invalid(f"{field}[{key}]", value, "must be a string")
        elif check_values and label_value_problem(value):
            causes.invalid(f"{field}", value, label_value_problem(value) or "")


def check_metadata(
    causes: Causes, metadata: dict[str, Any], field: str, max_name: int = 253
) -> None:
    """Check a name (when present), labels and annotations."""
    name = metadata.get("name")
    if name is not None:
        problem = subdomain_problem(name, max_name)
        if problem:
            causes.invalid(f"{field}.name", name, problem)
    _check_string_map(causes, f"{field}.labels", metadata.get("labels"), True)
    _check_string_map(
        causes, f"{field}.annotations", metadata.get("annotations"), False
    )


def _check_quantities(causes: Causes, field: str, resources: dict[str, Any]) -> None:
    for section in ("limits", "requests"):
        for resource, value in (resources.get(section) or {}).items():
            if parse_quantity(value) is None:
                message = "quantities must match the regular expression "
                causes.invalid(
                    f"{field}.{section}[{resource}]",
                    value,
                    message + "'^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$'",
                )
    limits, requests = resources.get("limits") or {}, resources.get("requests") or {}
    for resource, request in requests.items():
        limit = parse_quantity(limits.get(resource, "")) if resource in limits else None
        wanted = parse_quantity(request)
        if limit is not None and wanted is not None and wanted > limit:
            causes.invalid(
                f"{field}.requests[{resource}]",
                request,
                f"must be less than or equal to {resource} limit of {limits[resource]}",
            )


def _check_env(causes: Causes, field: str, env: list[dict[str, Any]]) -> None:
    for index, variable in enumerate(env):
        path = f"{field}[{index}]"
        name = variable.get("name")
        if not name:
            causes.required(f"{path}.name")
        elif not _ENV_NAME.match(name):
            causes.invalid(
                f"{path}.name",
                name,
                "a valid environment variable name must consist of alphabetic "
                "characters, digits, '_', '-', or '.', and must not start with a digit",
            )
        if "value" in variable and variable.get("valueFrom"):
            causes.invalid(
                f"{path}.valueFrom",
                "",
                "may not be specified when `value` is not empty",
            )


def _check_container(
    causes: Causes, field: str, container: dict[str, Any], names: set[str]
) -> None:
    name = container.get("name")
    if not name:
        causes.required(f"{field}.name")
    elif dns_label_problem(name):
        causes.invalid(f"{field}.name", name, dns_label_problem(name) or "")
    elif name in names:
        causes.duplicate(f"{field}.name", name)
    names.add(name or "")
    if not container.get("image"):
        causes.required(f"{field}.image")
    policy = container.get("imagePullPolicy")
    if policy not in ("Always", "IfNotPresent", "Never"):
        causes.unsupported(
            f"{field}.imagePullPolicy", policy, ["Always", "IfNotPresent", "Never"]
        )
    _check_env(causes, f"{field}.env", container.get("env") or [])
    _check_quantities(causes, f"{field}.resources", container.get("resources") or {})


def check_pod_template(
    causes: Causes, template: dict[str, Any] | None, field: str
) -> None:
    """Check a Job's pod template; Jobs allow restartPolicy Never or OnFailure."""
    if not template:
        causes.required(field)
        return
    check_metadata(causes, template.get("metadata") or {}, f"{field}.metadata")
    spec = template.get("spec") or {}
    containers = spec.get("containers") or []
    if not containers:
        causes.required(f"{field}.spec.containers")
    names: set[str] = set()
    for index, container in enumerate(containers):
        _check_container(causes, f"{field}.spec.containers[{index}]", container, names)
    policy = spec.get("restartPolicy")
    if policy not in ("OnFailure", "Never"):
        causes.unsupported(
            f"{field}.spec.restartPolicy", policy, ["OnFailure", "Never"]
        )
    grace = spec.get("terminationGracePeriodSeconds")
    if grace is not None and (not isinstance(grace, int) or grace < 0):
        causes.invalid(
            f"{field}.spec.terminationGracePeriodSeconds", grace, "must be >= 0"
        )


def _check_non_negative(
    causes: Causes, spec: dict[str, Any], field: str, key: str, minimum: int = 0
) -> None:
    value = spec.get(key)
    if value is not None and (not isinstance(value, int) or value < minimum):
        relation = "greater than 0" if minimum else "greater than or equal to 0"
        causes.invalid(f"{field}.{key}", value, f"must be {relation}")


def default_pod_spec(spec: dict[str, Any]) -> None:
    """Fill in the pod spec fields the API server defaults."""
    spec.setdefault("restartPolicy", "Always")
    spec.setdefault("dnsPolicy", "ClusterFirst")
    spec.setdefault("schedulerName", "default-scheduler")
    spec.setdefault("securityContext", {})
    spec.setdefault("terminationGracePeriodSeconds", 30)
    for container in spec.get("containers") or []:
        image = str(container.get("image") or "")
        tagged = ":" in image.rsplit("/", 1)[-1] and not image.endswith(":latest")
        default_policy = "IfNotPresent" if tagged or "@" in image else "Always"
        container.setdefault("imagePullPolicy", default_policy)
        container.setdefault("terminationMessagePath", "/dev/termination-log")
        container.setdefault("terminationMessagePolicy", "File")
        container.setdefault("resources", {})


def default_job(job: dict[str, Any]) -> None:
    """Fill in the Job spec fields the API server defaults (before validation)."""
    spec = job.setdefault("spec", {})
    spec.setdefault("parallelism", 1)
    spec.setdefault("completions", 1)
    spec.setdefault("backoffLimit", 6)
    spec.setdefault("completionMode", "NonIndexed")
    spec.setdefault("suspend", False)
    spec.setdefault("podReplacementPolicy", "TerminatingOrFailed")
    template = spec.get("template")
    if isinstance(template, dict):
        template.setdefault("metadata", {})
        default_pod_spec(template.setdefault("spec", {}))


def _check_faults(causes: Causes, job: dict[str, Any]) -> None:
    template = (job.get("spec") or {}).get("template") or {}
    annotated = {
        "metadata.annotations": job["metadata"],
        "spec.template.metadata.annotations": template.get("metadata") or {},
    }
    for field, metadata in annotated.items():
        annotations = metadata.get("annotations") or {}
        problem = annotation_problem(annotations)
        if problem:
            causes.invalid(field, annotations.get(FAULT_ANNOTATION, ""), problem)


def validate_job(job: dict[str, Any], name: str, existing: bool = False) -> None:
    """Check a Job as created, or as changed when ``existing``.

    Raises:
        Invalid: listing every broken rule.
    """
    causes = Causes()
    check_metadata(causes, job["metadata"], "metadata")
    _check_faults(causes, job)
    if len(name) > 63 and not subdomain_problem(name):
        # The name becomes the pods' job-name label, so it must fit a label value.
        causes.invalid("metadata.name", name, "must be no more than 63 characters")
    spec = job.get("spec") or {}
    check_pod_template(causes, spec.get("template"), "spec.template")
    for key in (
        "parallelism",
        "completions",
        "backoffLimit",
        "ttlSecondsAfterFinished",
    ):
        _check_non_negative(causes, spec, "spec", key)
    _check_non_negative(causes, spec, "spec", "activeDeadlineSeconds", 1)
    if spec.get("selector") and not spec.get("manualSelector") and not existing:
        causes.invalid(
            "spec.selector", spec["selector"], "`selector` will be auto-generated"
        )
    causes.raise_if_any("Job", "batch", name)


def _cron_field_problem(text: str, index: int) -> str | None:
    low, high = _CRON_RANGES[index]
    for item in text.split(","):
        body, _, step = item.partition("/")
        if step and not step.isdigit():
            return f"failed to parse int from {step}"
        if body in ("*", "?"):
            continue
        for bound in body.split("-", 1):
            value = _CRON_NAMES[index].get(bound.upper())
            if value is None and not bound.isdigit():
                return f"failed to parse int from {bound}"
            value = int(bound) if value is None else value
            if not low <= value <= high:
                return f"end of range ({value}) above maximum ({high}): {body}"
    return None


def cron_problem(schedule: str) -> str | None:
    """Say why a CronJob schedule does not parse, or return None."""
    if schedule in _CRON_MACROS or schedule.startswith("@every "):
        return None
    if "TZ=" in schedule:
        return "cannot use TZ or CRON_TZ in schedule, use timeZone field instead"
    fields = schedule.split()
    if len(fields) != 5:
        return f"expected exactly 5 fields, found {len(fields)}: {schedule}"
    problems = (_cron_field_problem(text, i) for i, text in enumerate(fields))
    return next((problem for problem in problems if problem), None)


def default_cronjob(cronjob: dict[str, Any]) -> None:
    """Fill in the CronJob spec fields the API server defaults."""
    spec = cronjob.setdefault("spec", {})
    spec.setdefault("concurrencyPolicy", "Allow")
    spec.setdefault("suspend", False)
    spec.setdefault("successfulJobsHistoryLimit", 3)
    spec.setdefault("failedJobsHistoryLimit", 1)
    job_spec = (spec.get("jobTemplate") or {}).get("spec") or {}
    template = job_spec.get("template")
    if isinstance(template, dict):
        template.setdefault("metadata", {})
        default_pod_spec(template.setdefault("spec", {}))


def validate_cronjob(cronjob: dict[str, Any], name: str) -> None:
    """Check a CronJob as created; its name leaves room for the Jobs' suffix.

    Raises:
        Invalid: listing every broken rule.
    """
    causes = Causes()
    check_metadata(causes, cronjob["metadata"], "metadata", max_name=52)
    spec = cronjob.get("spec") or {}
    schedule = spec.get("schedule")
    if not schedule:
        causes.required("spec.schedule")
    elif cron_problem(schedule):
        causes.invalid("spec.schedule", schedule, cron_problem(schedule) or "")
    zone = spec.get("timeZone")
    if zone is not None and zone not in zoneinfo.available_timezones():
        causes.invalid("spec.timeZone", zone, "unknown time zone " + str(zone))
    policy = spec.get("concurrencyPolicy")
    if policy not in ("Allow", "Forbid", "Replace"):
        causes.unsupported(
            "spec.concurrencyPolicy", policy, ["Allow", "Forbid", "Replace"]
        )
    _check_non_negative(causes, spec, "spec", "startingDeadlineSeconds")
    job_template = spec.get("jobTemplate") or {}
    check_metadata(
        causes, job_template.get("metadata") or {}, "spec.jobTemplate.metadata"
    )
    job_spec = job_template.get("spec") or {}
    check_pod_template(
        causes, job_spec.get("template"), "spec.jobTemplate.spec.template"
    )
    causes.raise_if_any("CronJob", "batch", name)


def default_secret(secret: dict[str, Any]) -> None:
    """Fold ``stringData`` into ``data`` and default the type, as the server does."""
    secret.setdefault("type", "Opaque")
    string_data = secret.pop("stringData", None) or {}
    data = secret.setdefault("data", {}) or {}
    for key, value in string_data.items():
        data[key] = base64.b64encode(str(value).encode()).decode()
    secret["data"] = data


def validate_secret(secret: dict[str, Any], name: str) -> None:
    """Check a Secret as created: keys and base64 values.

    Raises:
        Invalid: listing every broken rule.
    """
    causes = Causes()
    check_metadata(causes, secret["metadata"], "metadata")
    size = 0
    for key, value in (secret.get("data") or {}).items():
        if not _SECRET_KEY.match(key):
            causes.invalid(
                "data",
                key,
                "a valid config key must consist of alphanumeric "
                "characters, '-', '_' or '.'",
            )
        try:
            size += len(base64.b64decode(str(value), validate=True))
        except binascii.Error:
            causes.invalid(
                f"data[{key}]", "<secret contents redacted>", "illegal base64 data"
            )
    if size > 1024 * 1024:
        causes.invalid("data", "", "Too long: must have at most 1048576 bytes")
    causes.raise_if_any("Secret", "", name)
