"""Create, patch and delete, with each resource's own rules."""

from __future__ import annotations

import copy
import uuid
from typing import Any

from ._controller import Cluster, random_suffix
from ._errors import ApiError, Invalid, bad_request, method_not_allowed
from ._store import RESOURCES, Object, Store
from ._validation import (
    DNS_LABEL_MESSAGE,
    Causes,
    check_metadata,
    default_cronjob,
    default_job,
    default_secret,
    dns_label_problem,
    validate_cronjob,
    validate_job,
    validate_secret,
)

CREATABLE = {"jobs", "cronjobs", "secrets"}
_JOB_IMMUTABLE = ("template", "selector", "completions", "completionMode")
_POLICIES = ("Orphan", "Background", "Foreground")


def check_namespace(namespace: str) -> None:
    """Reject a namespace that could not exist.

    Raises:
        Invalid: 422 when the name is not a DNS-1123 label.
    """
    problem = dns_label_problem(namespace)
    if problem:
        cause = {
            "reason": "FieldValueInvalid",
            "message": f'Invalid value: "{namespace}": {problem or DNS_LABEL_MESSAGE}',
            "field": "metadata.namespace",
        }
        raise Invalid("Namespace", "", namespace, [cause])


def _check_type(plural: str, obj: Any, namespace: str) -> dict[str, Any]:
    resource = RESOURCES[plural]
    if not isinstance(obj, dict):
        raise bad_request("the body of the request was in an unknown format")
    version = obj.get("apiVersion", resource.api_version)
    if version != resource.api_version:
        raise bad_request(
            f"the API version in the data ({version}) does not match the expected "
            f"API version ({resource.api_version})"
        )
    kind = obj.get("kind", resource.kind)
    if kind != resource.kind:
        raise bad_request(
            f"the kind in the data ({kind}) does not match the expected kind "
            f"({resource.kind})"
        )
    metadata: dict[str, Any] = obj.setdefault("metadata", {})
    if metadata.get("namespace", namespace) != namespace:
        raise bad_request(
            "the namespace of the provided object does not match the namespace "
            "sent on the request"
        )
    metadata["namespace"] = namespace
    return metadata


def _name(plural: str, metadata: dict[str, Any]) -> str:
    if metadata.get("resourceVersion"):
        raise bad_request("resourceVersion should not be set on objects to be created")
    if not metadata.get("name") and metadata.get("generateName"):
        metadata["name"] = metadata["generateName"][:58] + random_suffix()
    if not metadata.get("name"):
        causes = Causes()
        causes.required("metadata.name")
        raise Invalid(
            RESOURCES[plural].kind, RESOURCES[plural].group, "", causes.causes
        )
    for key in ("uid", "creationTimestamp", "deletionTimestamp", "generation"):
        metadata.pop(key, None)
    return str(metadata["name"])


def _prepare_job(job: Object, name: str) -> None:
    metadata = job["metadata"]
    metadata["uid"] = str(uuid.uuid4())
    metadata["generation"] = 1
    job.pop("status", None)
    default_job(job)
    template = job["spec"].get("template")
    if isinstance(template, dict) and not job["spec"].get("manualSelector"):
        uid = metadata["uid"]
        labels = template["metadata"].setdefault("labels", {}) or {}
        labels.update(
            {
                "batch.kubernetes.io/controller-uid": uid,
                "batch.kubernetes.io/job-name": name,
                "controller-uid": uid,
                "job-name": name,
            }
        )
        template["metadata"]["labels"] = labels
        # Validated before the selector is generated: a given selector is an error.
        validate_job(job, name)
        job["spec"]["selector"] = {
            "matchLabels": {"batch.kubernetes.io/controller-uid": uid}
        }
        metadata.setdefault("labels", dict(labels))
    else:
        validate_job(job, name)
    job["status"] = {}


def _prepare(plural: str, obj: Object, name: str) -> None:
    if plural == "jobs":
        _prepare_job(obj, name)
    elif plural == "cronjobs":
        obj["metadata"]["generation"] = 1
        obj.pop("status", None)
        default_cronjob(obj)
        validate_cronjob(obj, name)
        obj["status"] = {}
    elif plural == "secrets":
        default_secret(obj)
        validate_secret(obj, name)


def create(
    store: Store,
    cluster: Cluster,
    plural: str,
    namespace: str,
    body: Any,
    dry_run: bool,
) -> Object:
    """Validate, default and store a new object; a Job starts its controller.

    Raises:
        ApiError: 400, 405, 409 or 422 as a real API server would.
    """
    if plural not in CREATABLE:
        raise method_not_allowed("POST", plural)
    check_namespace(namespace)
    metadata = _check_type(plural, body, namespace)
    obj: Object = body
    name = _name(plural, metadata)
    _prepare(plural, obj, name)
    if dry_run:
        return obj
    created = store.create(plural, obj)
    if plural == "jobs":
        cluster.start_job(created)
    return created


def merge_patch(target: Any, patch: Any) -> Any:
    """Apply an RFC 7386 JSON merge patch (null removes a key)."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def _check_patched(plural: str, old: Object, new: Object) -> None:
    name = old["metadata"]["name"]
    causes = Causes()
    check_metadata(causes, new["metadata"], "metadata")
    if plural == "jobs":
        for key in _JOB_IMMUTABLE:
            if new["spec"].get(key) != old["spec"].get(key):
                causes.invalid(
                    f"spec.{key}", new["spec"].get(key), "field is immutable"
                )
    kind, group = RESOURCES[plural].kind, RESOURCES[plural].group
    causes.raise_if_any(kind, group, name)
    if plural == "jobs":
        validate_job(new, name, existing=True)
    elif plural == "cronjobs":
        validate_cronjob(new, name)


def patch(
    store: Store, plural: str, namespace: str, name: str, body: Any, content_type: str
) -> Object:
    """Apply a merge patch (strategic merge is treated as a merge patch).

    Raises:
        ApiError: 404, 415 or 422.
    """
    if "json-patch" in content_type or not isinstance(body, dict):
        # TODO: support JSON patch (RFC 6902) when a caller needs it.
        raise ApiError(
            415, "UnsupportedMediaType", f"unsupported patch type {content_type}"
        )
    old = store.get(plural, namespace, name)
    new = merge_patch(old, body)
    for key in ("name", "namespace", "uid", "creationTimestamp", "generation"):
        if key in old["metadata"]:
            new["metadata"][key] = old["metadata"][key]
    new["status"] = old.get("status", {})
    _check_patched(plural, old, new)

    def replace(obj: Object) -> None:
        obj.clear()
        obj.update(new)

    return store.update(plural, namespace, name, replace) or new


def _policy(query: dict[str, str], options: dict[str, Any], plural: str) -> str:
    policy = query.get("propagationPolicy") or options.get("propagationPolicy")
    if policy is None and options.get("orphanDependents") is not None:
        policy = "Orphan" if options["orphanDependents"] else "Background"
    # batch/v1 Jobs keep their pods unless told otherwise, for compatibility.
    policy = policy or ("Orphan" if plural == "jobs" else "Background")
    if policy not in _POLICIES:
        causes = Causes()
        causes.unsupported("propagationPolicy", policy, list(_POLICIES))
        raise Invalid("DeleteOptions", "", "", causes.causes)
    return str(policy)


def _grace(query: dict[str, str], options: dict[str, Any]) -> float | None:
    value = query.get("gracePeriodSeconds", options.get("gracePeriodSeconds"))
    return None if value is None else float(value)


def _check_preconditions(obj: Object, options: dict[str, Any]) -> None:
    wanted = options.get("preconditions") or {}
    for key in ("uid", "resourceVersion"):
        if wanted.get(key) and wanted[key] != obj["metadata"][key]:
            message = (
                f"Precondition failed: {key} in precondition: {wanted[key]}, "
                f"{key} in object meta: {obj['metadata'][key]}"
            )
            raise ApiError(409, "Conflict", message)


def delete(
    store: Store,
    cluster: Cluster,
    target: tuple[str, str, str],
    query: dict[str, str],
    options: Any,
) -> Object:
    """Delete one object; Jobs honour propagation, pods are terminated.

    Raises:
        ApiError: 404, 405, 409 or 422.
    """
    plural, namespace, name = target
    options = options if isinstance(options, dict) else {}
    _check_preconditions(store.get(plural, namespace, name), options)
    if plural == "pods":
        return cluster.delete_pod(namespace, name, _grace(query, options))
    if plural == "events":
        raise method_not_allowed("DELETE", plural)
    if plural == "jobs":
        policy = _policy(query, options, plural)
        deleted = cluster.delete_job(namespace, name, policy)
        if policy == "Foreground":
            return deleted
    else:
        _policy(query, options, plural)
        deleted = store.delete(plural, namespace, name)
    details = {
        "name": name,
        "group": RESOURCES[plural].group,
        "kind": plural,
        "uid": deleted["metadata"]["uid"],
    }
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Success",
        "details": details,
    }
