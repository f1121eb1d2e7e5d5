"""Builders for the status parts of Pods and Jobs, and for Events."""

from __future__ import annotations

import hashlib
import secrets
from typing import Any

from ._store import Object, now
from ._validation import parse_quantity


def set_condition(
    status: dict[str, Any],
    kind: str,
    value: str,
    reason: str | None = None,
    message: str | None = None,
    probed: bool = False,
) -> None:
    """Add or replace one condition, keeping its transition time if unchanged.

    Job conditions carry a ``lastProbeTime`` (``probed``); pod conditions do not.
    """
    conditions: list[dict[str, Any]] = status.setdefault("conditions", [])
    old = next((c for c in conditions if c["type"] == kind), None)
    condition: dict[str, Any] = {"type": kind, "status": value}
    condition["lastProbeTime"] = now() if probed else None
    if old and old["status"] == value:
        condition["lastTransitionTime"] = old["lastTransitionTime"]
    else:
        condition["lastTransitionTime"] = now()
    if reason:
        condition["reason"] = reason
    if message:
        condition["message"] = message
    if old:
        conditions[conditions.index(old)] = condition
    else:
        conditions.append(condition)


def image_id(image: str) -> str:
    """Return a stable digest-style image ID for an image name."""
    digest = hashlib.sha256(image.encode()).hexdigest()
    return f"{image.split(':')[0]}@sha256:{digest}"


def container_status(
    container: dict[str, Any],
    state: dict[str, Any],
    restart_count: int = 0,
    last_state: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Return a complete ``containerStatuses`` entry for one state."""
    started = "running" in state
    status: dict[str, Any] = {
        "name": container["name"],
        "image": container["image"],
        "imageID": "" if "waiting" in state else image_id(container["image"]),
        "ready": started,
        "started": started,
        "restartCount": restart_count,
        "state": state,
        "lastState": last_state or {},
    }
    if "waiting" not in state:
        status["containerID"] = "containerd://" + secrets.token_hex(32)
    return status


def waiting(reason: str, message: str | None = None) -> dict[str, Any]:
    """Return a container state ``waiting`` with a reason."""
    state: dict[str, Any] = {"reason": reason}
    if message:
        state["message"] = message
    return {"waiting": state}


def terminated(
    exit_code: int, reason: str, started_at: str, message: str | None = None
) -> dict[str, Any]:
    """Return a container state ``terminated``."""
    state: dict[str, Any] = {
        "exitCode": exit_code,
        "reason": reason,
        "startedAt": started_at,
        "finishedAt": now(),
    }
    if message:
        state["message"] = message
    return {"terminated": state}


def qos_class(spec: dict[str, Any]) -> str:
    """Return the pod's QoS class from its containers' resources."""
    resources = [c.get("resources") or {} for c in spec.get("containers") or []]
    if not any(r.get("limits") or r.get("requests") for r in resources):
        return "BestEffort"
    for r in resources:
        limits, requests = r.get("limits") or {}, r.get("requests") or {}
        for name in ("cpu", "memory"):
            limit = parse_quantity(limits.get(name, "")) if name in limits else None
            wanted = parse_quantity(requests.get(name, limits.get(name, "")))
            if limit is None or limit != wanted:
                return "Burstable"
    return "Guaranteed"


def event(
    involved: Object,
    kind: str,
    reason: str,
    message: str,
    component: str,
    field_path: str | None = None,
) -> Object:
    """Return a v1 Event about ``involved`` (a Job or a Pod)."""
    metadata = involved["metadata"]
    reference = {
        "kind": involved["kind"],
        "namespace": metadata["namespace"],
        "name": metadata["name"],
        "uid": metadata["uid"],
        "apiVersion": involved["apiVersion"],
        "resourceVersion": metadata["resourceVersion"],
    }
    if field_path:
        reference["fieldPath"] = field_path
    timestamp = now()
    return {
        "metadata": {
            "name": f"{metadata['name']}.{secrets.token_hex(8)}",
            "namespace": metadata["namespace"],
        },
        "involvedObject": reference,
        "reason": reason,
        "message": message,
        "source": {"component": component},
        "firstTimestamp": timestamp,
        "lastTimestamp": timestamp,
        "count": 1,
        "type": kind,
        "reportingComponent": component,
        "reportingInstance": "",
    }
