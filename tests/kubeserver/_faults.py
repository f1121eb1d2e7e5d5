"""Faults a test can inject into the pods of chosen Jobs."""

from __future__ import annotations

import enum
import re
import threading
from dataclasses import dataclass
from typing import Any

FAULT_ANNOTATION = "kubeserver.test/fault"
FAULT_AFTER_ANNOTATION = "kubeserver.test/fault-after"
DEFAULT_AFTER = 0.2


class Fault(str, enum.Enum):
    """What goes wrong with a pod, as a real cluster would report it."""

    OOM = "oom"
    IMAGE_PULL = "image-pull"
    UNSCHEDULABLE = "unschedulable"
    EVICT = "evict"


@dataclass(frozen=True)
class Injection:
    """A fault chosen for one pod; ``after`` is seconds after its start."""

    fault: Fault
    after: float = DEFAULT_AFTER


@dataclass
class _Rule:
    injection: Injection
    job: re.Pattern[str] | None
    namespace: str | None
    times: int | None

    def matches(self, namespace: str, job: str) -> bool:
        if self.namespace is not None and self.namespace != namespace:
            return False
        return self.job is None or bool(self.job.fullmatch(job))


class Faults:
    """Rules added by ``KubeServer.inject``, consumed by the pods they match."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._rules: list[_Rule] = []

    def add(
        self,
        fault: Fault | str,
        job: str | None,
        namespace: str | None,
        times: int | None,
        after: float,
    ) -> None:
        pattern = re.compile(job) if job is not None else None
        rule = _Rule(Injection(Fault(fault), after), pattern, namespace, times)
        with self._lock:
            self._rules.append(rule)

    def clear(self) -> None:
        with self._lock:
            self._rules.clear()

    def take(self, namespace: str, job: str) -> Injection | None:
        """Return the first matching rule's fault, using up one of its times."""
        with self._lock:
            for rule in self._rules:
                if rule.matches(namespace, job):
                    if rule.times is not None:
                        rule.times -= 1
                        if rule.times <= 0:
                            self._rules.remove(rule)
                    return rule.injection
        return None


def annotation_problem(annotations: dict[str, Any]) -> str | None:
    """Say what is wrong with the fault annotations, or return None."""
    fault = annotations.get(FAULT_ANNOTATION)
    if fault is not None and fault not in {f.value for f in Fault}:
        choices = ", ".join(f.value for f in Fault)
        return f"{FAULT_ANNOTATION} must be one of {choices}"
    try:
        float(annotations.get(FAULT_AFTER_ANNOTATION, DEFAULT_AFTER))
    except ValueError:
        return f"{FAULT_AFTER_ANNOTATION} must be a number of seconds"
    return None


def from_annotations(*annotated: dict[str, Any]) -> Injection | None:
    """Return the fault named by a ``kubeserver.test/fault`` annotation, if any."""
    for metadata in annotated:
        annotations = metadata.get("annotations") or {}
        if FAULT_ANNOTATION in annotations:
            after = float(annotations.get(FAULT_AFTER_ANNOTATION, DEFAULT_AFTER))
            return Injection(Fault(annotations[FAULT_ANNOTATION]), after)
    return None
