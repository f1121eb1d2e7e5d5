"""The object store: resource versions, history for watches, and waiting."""

from __future__ import annotations

import copy
import datetime
import threading
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ._errors import already_exists, gone, not_found

Object = dict[str, Any]


@dataclass(frozen=True)
class Resource:
    """One kind of object the server serves."""

    plural: str
    group: str
    version: str
    kind: str

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version


RESOURCES = {
    "jobs": Resource("jobs", "batch", "v1", "Job"),
    "cronjobs": Resource("cronjobs", "batch", "v1", "CronJob"),
    "pods": Resource("pods", "", "v1", "Pod"),
    "events": Resource("events", "", "v1", "Event"),
    "secrets": Resource("secrets", "", "v1", "Secret"),
}


@dataclass(frozen=True)
class Change:
    """One write, as a watch reports it; ``previous`` is the object before it."""

    resource_version: int
    type: str
    plural: str
    namespace: str
    obj: Object
    previous: Object | None


def now() -> str:
    """Return the current time as the API server formats timestamps."""
    moment = datetime.datetime.now(datetime.timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


class Store:
    """Every object, a global resourceVersion, and the recent changes.

    Args:
        history_limit: How many changes a watch can resume from.
    """

    def __init__(self, history_limit: int = 10_000) -> None:
        self.lock = threading.RLock()
        self.changed = threading.Condition(self.lock)
        self.closed = False
        self._objects: dict[tuple[str, str, str], Object] = {}
        self._version = 0
        self._history: deque[Change] = deque(maxlen=history_limit)
        self._compacted = 0

    @property
    def version(self) -> int:
        """The resourceVersion of the latest write."""
        return self._version

    def _record(
        self, kind: str, plural: str, obj: Object, previous: Object | None
    ) -> Object:
        self._version += 1
        obj["metadata"]["resourceVersion"] = str(self._version)
        if len(self._history) == self._history.maxlen:
            self._compacted = self._history[0].resource_version
        change = Change(
            self._version,
            kind,
            plural,
            obj["metadata"]["namespace"],
            copy.deepcopy(obj),
            previous,
        )
        self._history.append(change)
        self.changed.notify_all()
        return copy.deepcopy(obj)

    def create(self, plural: str, obj: Object) -> Object:
        """Store a new object, giving it a uid, resourceVersion and timestamp.

        Raises:
            ApiError: 409 when the name is taken.
        """
        resource = RESOURCES[plural]
        metadata = obj["metadata"]
        key = (plural, metadata["namespace"], metadata["name"])
        with self.lock:
            if key in self._objects:
                raise already_exists(plural, resource.group, metadata["name"])
            metadata.setdefault("uid", str(uuid.uuid4()))
            metadata.setdefault("creationTimestamp", now())
            obj["apiVersion"], obj["kind"] = resource.api_version, resource.kind
            self._objects[key] = obj
            return self._record("ADDED", plural, obj, None)

    def get(self, plural: str, namespace: str, name: str) -> Object:
        """Return a copy of one object.

        Raises:
            ApiError: 404 when it does not exist.
        """
        with self.lock:
            obj = self._objects.get((plural, namespace, name))
            if obj is None:
                raise not_found(plural, RESOURCES[plural].group, name)
            return copy.deepcopy(obj)

    def find(self, plural: str, namespace: str, name: str) -> Object | None:
        """Return a copy of one object, or None."""
        with self.lock:
            obj = self._objects.get((plural, namespace, name))
            return copy.deepcopy(obj) if obj is not None else None

    def update(
        self, plural: str, namespace: str, name: str, change: Callable[[Object], None]
    ) -> Object | None:
        """Apply ``change`` to a stored object and record it as MODIFIED.

        Returns:
            A copy of the changed object, or None when it no longer exists (a
            controller racing a delete just stops).
        """
        with self.lock:
            obj = self._objects.get((plural, namespace, name))
            if obj is None:
                return None
            previous = copy.deepcopy(obj)
            change(obj)
            if obj == previous:
                return copy.deepcopy(obj)
            return self._record("MODIFIED", plural, obj, previous)

    def delete(self, plural: str, namespace: str, name: str) -> Object:
        """Remove an object and record it as DELETED.

        Raises:
            ApiError: 404 when it does not exist.
        """
        with self.lock:
            obj = self._objects.pop((plural, namespace, name), None)
            if obj is None:
                raise not_found(plural, RESOURCES[plural].group, name)
            return self._record("DELETED", plural, obj, copy.deepcopy(obj))

    def items(
        self,
        plural: str,
        namespace: str | None,
        matches: Callable[[Object], bool] = lambda obj: True,
    ) -> list[Object]:
        """Return copies of the matching objects, sorted by namespace and name."""
        with self.lock:
            found = [
                copy.deepcopy(obj)
                for (kind, space, _), obj in sorted(self._objects.items())
                if kind == plural and namespace in (None, space) and matches(obj)
            ]
        return found

    def changes_after(self, version: int, timeout: float) -> list[Change]:
        """Wait up to ``timeout`` for changes newer than ``version``.

        Raises:
            ApiError: 410 when changes after ``version`` were already forgotten.
        """
        with self.lock:
            if version < self._compacted:
                raise gone(version, self._compacted)
            self.changed.wait_for(
                lambda: self._version > version or self.closed, timeout
            )
            if version < self._compacted:
                raise gone(version, self._compacted)
            return [c for c in self._history if c.resource_version > version]

    def compact(self) -> None:
        """Forget the history, as etcd compaction does; older watches get 410."""
        with self.lock:
            self._history.clear()
            self._compacted = self._version

    def close(self) -> None:
        """Wake every waiting watch so that it ends."""
        with self.lock:
            self.closed = True
            self.changed.notify_all()
