"""The HTTP side: routing, JSON replies, watch streams and log streams."""

from __future__ import annotations

import base64
import json
import logging
import time
import urllib.parse
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from typing import TYPE_CHECKING, Any

from . import _objects
from ._errors import (
    ApiError,
    bad_request,
    method_not_allowed,
    no_route,
    not_found,
    unauthorized,
)
from ._selectors import field_matcher, label_matcher
from ._store import RESOURCES, Change, Object
from ._validation import dns_label_problem

if TYPE_CHECKING:
    from ._server import KubeServer

logger = logging.getLogger(__name__)

_DEFAULT_WATCH_SECONDS = 1800.0
_TRUE = {"1", "t", "T", "true", "TRUE", "True"}
VERSION = {
    "major": "1",
    "minor": "33",
    "emulationMajor": "1",
    "emulationMinor": "33",
    "minCompatibilityMajor": "1",
    "minCompatibilityMinor": "32",
    "gitVersion": "v1.33.1",
    "gitCommit": "8adc0f041b8e7ad1d30e29cc59c6ae7a15e19828",
    "gitTreeState": "clean",
    "buildDate": "2025-05-15T08:19:08Z",
    "goVersion": "go1.24.2",
    "compiler": "gc",
    "platform": "linux/amd64",
}


@dataclass(frozen=True)
class Route:
    """What a path names: a resource, maybe a namespace, name and subresource."""

    plural: str
    namespace: str | None
    name: str | None
    subresource: str | None
    watch_path: bool


def parse_route(path: str) -> Route | None:
    """Map a path to a resource route, or None when it is not one."""
    parts = [urllib.parse.unquote(p) for p in path.strip("/").split("/")]
    if parts[:2] == ["api", "v1"]:
        rest, group = parts[2:], ""
    elif parts[:3] == ["apis", "batch", "v1"]:
        rest, group = parts[3:], "batch"
    else:
        return None
    watch_path = bool(rest) and rest[0] == "watch"
    rest = rest[1:] if watch_path else rest
    namespace = None
    if len(rest) >= 3 and rest[0] == "namespaces":
        namespace, rest = rest[1], rest[2:]
    if not rest or rest[0] not in RESOURCES or RESOURCES[rest[0]].group != group:
        return None
    if len(rest) > 3 or (len(rest) > 1 and namespace is None):
        return None
    name = rest[1] if len(rest) > 1 else None
    subresource = rest[2] if len(rest) > 2 else None
    return Route(rest[0], namespace, name, subresource, watch_path)


def _resource_list(group_version: str) -> Object:
    resources = [
        {
            "name": plural,
            "singularName": resource.kind.lower(),
            "namespaced": True,
            "kind": resource.kind,
            "verbs": ["create", "delete", "get", "list", "patch", "watch"],
        }
        for plural, resource in RESOURCES.items()
        if resource.api_version == group_version
    ]
    if group_version == "v1":
        resources.append(
            {
                "name": "pods/log",
                "singularName": "",
                "namespaced": True,
                "kind": "Pod",
                "verbs": ["get"],
            }
        )
    return {
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": group_version,
        "resources": resources,
    }


def _discovery(path: str, address: str) -> Object | None:
    batch = {"groupVersion": "batch/v1", "version": "v1"}
    documents: dict[str, Object] = {
        "/version": VERSION,
        "/api": {
            "kind": "APIVersions",
            "versions": ["v1"],
            "serverAddressByClientCIDRs": [
                {"clientCIDR": "0.0.0.0/0", "serverAddress": address}
            ],
        },
        "/apis": {
            "kind": "APIGroupList",
            "apiVersion": "v1",
            "groups": [
                {"name": "batch", "versions": [batch], "preferredVersion": batch}
            ],
        },
        "/apis/batch": {
            "kind": "APIGroup",
            "apiVersion": "v1",
            "name": "batch",
            "versions": [batch],
            "preferredVersion": batch,
        },
        "/api/v1": _resource_list("v1"),
        "/apis/batch/v1": _resource_list("batch/v1"),
    }
    return documents.get(path.rstrip("/") or path)


def _namespace(name: str) -> Object:
    if dns_label_problem(name):
        raise not_found("namespaces", "", name)
    return {
        "kind": "Namespace",
        "apiVersion": "v1",
        "metadata": {
            "name": name,
            "uid": f"00000000-0000-4000-8000-{abs(hash(name)) % 10**12:012d}",
            "resourceVersion": "1",
            "creationTimestamp": "2025-01-01T00:00:00Z",
            "labels": {"kubernetes.io/metadata.name": name},
        },
        "spec": {"finalizers": ["kubernetes"]},
        "status": {"phase": "Active"},
    }


def _flag(query: dict[str, str], key: str) -> bool:
    return query.get(key, "false") in _TRUE


def _integer(query: dict[str, str], key: str) -> int | None:
    if key not in query:
        return None
    try:
        return int(query[key])
    except ValueError:
        raise bad_request(f"invalid {key}: {query[key]!r}") from None


class Handler(BaseHTTPRequestHandler):
    """One connection to the test API server; ``self.server.kube`` is the server."""

    protocol_version = "HTTP/1.1"
    server_version = "kubeserver"

    @property
    def kube(self) -> KubeServer:
        return self.server.kube  # type: ignore[attr-defined,no-any-return]

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("%s %s", self.address_string(), format % args)

    def do_GET(self) -> None:
        self._handle("GET")

    def do_POST(self) -> None:
        self._handle("POST")

    def do_PUT(self) -> None:
        self._handle("PUT")

    def do_PATCH(self) -> None:
        self._handle("PATCH")

    def do_DELETE(self) -> None:
        self._handle("DELETE")

    def _handle(self, method: str) -> None:
        url = urllib.parse.urlsplit(self.path)
        query = dict(urllib.parse.parse_qsl(url.query, keep_blank_values=True))
        self.kube.record_request(method, url.path, url.query)
        try:
            body = self._body()
            self._check_token()
            self._dispatch(method, url.path, query, body)
        except ApiError as error:
            logger.debug("%s %s -> %d %s", method, url.path, error.code, error.message)
            self._send_json(error.code, error.status())
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def _body(self) -> Any:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        if not raw:
            return None
        try:
            return json.loads(raw)
        except json.JSONDecodeError as error:
            raise bad_request(
                f"couldn't get version/kind; json parse error: {error}"
            ) from None

    def _check_token(self) -> None:
        token = self.kube.token
        if token and self.headers.get("Authorization") != f"Bearer {token}":
            raise unauthorized()

    def _send_json(self, code: int, payload: Any) -> None:
        data = json.dumps(payload).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _send_text(self, data: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _start_stream(self, content_type: str) -> None:
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.wfile.flush()

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def _end_stream(self) -> None:
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def _dispatch(
        self, method: str, path: str, query: dict[str, str], body: Any
    ) -> None:
        document = _discovery(path, self.kube.address) if method == "GET" else None
        if document is not None:
            self._send_json(200, document)
            return
        parts = path.strip("/").split("/")
        if (
            method == "GET"
            and parts[:3] == ["api", "v1", "namespaces"]
            and len(parts) == 4
        ):
            self._send_json(200, _namespace(parts[3]))
            return
        route = parse_route(path)
        if route is None:
            raise no_route()
        self._resource(method, route, query, body)

    def _resource(
        self, method: str, route: Route, query: dict[str, str], body: Any
    ) -> None:
        store, cluster = self.kube.store, self.kube.cluster
        if method == "GET" and route.subresource == "log":
            self._log(route, query)
        elif route.subresource is not None:
            raise no_route()
        elif method == "GET" and (route.watch_path or _flag(query, "watch")):
            self._watch(route, query)
        elif method == "GET" and route.name is None:
            self._send_json(200, self._list(route, query))
        elif method == "GET" and route.name is not None:
            self._send_json(
                200, store.get(route.plural, str(route.namespace), route.name)
            )
        elif method == "POST" and route.name is None and route.namespace is not None:
            dry_run = query.get("dryRun") == "All"
            created = _objects.create(
                store, cluster, route.plural, route.namespace, body, dry_run
            )
            self._send_json(201, created)
        elif method == "PATCH" and route.name is not None and route.plural != "events":
            content_type = self.headers.get("Content-Type", "")
            patched = _objects.patch(
                store,
                route.plural,
                str(route.namespace),
                route.name,
                body,
                content_type,
            )
            self._send_json(200, patched)
        elif method == "DELETE" and route.name is not None:
            target = (route.plural, str(route.namespace), route.name)
            self._send_json(200, _objects.delete(store, cluster, target, query, body))
        else:
            raise method_not_allowed(method, route.plural)

    def _matcher(self, route: Route, query: dict[str, str]) -> Any:
        labels = label_matcher(query.get("labelSelector"))
        fields = field_matcher(route.plural, query.get("fieldSelector"))
        return lambda obj: labels(obj) and fields(obj)

    def _list(self, route: Route, query: dict[str, str]) -> Object:
        resource = RESOURCES[route.plural]
        matches = self._matcher(route, query)
        with self.kube.store.lock:
            items = self.kube.store.items(route.plural, route.namespace, matches)
            version = self.kube.store.version
        start = 0
        if query.get("continue"):
            start = int(base64.urlsafe_b64decode(query["continue"]).decode())
        limit = _integer(query, "limit") or 0
        end = start + limit if limit > 0 else len(items)
        metadata: dict[str, Any] = {"resourceVersion": str(version)}
        if end < len(items):
            metadata["continue"] = base64.urlsafe_b64encode(str(end).encode()).decode()
            metadata["remainingItemCount"] = len(items) - end
        for item in items:
            item.pop("kind", None)
            item.pop("apiVersion", None)
        return {
            "kind": f"{resource.kind}List",
            "apiVersion": resource.api_version,
            "metadata": metadata,
            "items": items[start:end],
        }

    def _watch(self, route: Route, query: dict[str, str]) -> None:
        matches = self._matcher(route, query)
        timeout = _integer(query, "timeoutSeconds")
        deadline = time.monotonic() + (
            timeout if timeout is not None else _DEFAULT_WATCH_SECONDS
        )
        requested = query.get("resourceVersion", "")
        store = self.kube.store
        with store.lock:
            version = store.version
            initial = (
                []
                if requested not in ("", "0")
                else store.items(route.plural, route.namespace, matches)
            )
        if requested not in ("", "0"):
            try:
                version = int(requested)
            except ValueError:
                raise bad_request(f"invalid resource version: {requested}") from None
        self._start_stream("application/json")
        for obj in initial:
            self._event("ADDED", obj)
        self._follow_changes(route, matches, version, deadline)
        self._end_stream()

    def _follow_changes(
        self, route: Route, matches: Any, version: int, deadline: float
    ) -> None:
        store = self.kube.store
        while not store.closed and (remaining := deadline - time.monotonic()) > 0:
            try:
                changes = store.changes_after(version, remaining)
            except ApiError as error:
                # A real server reports an expired version inside the stream.
                self._event("ERROR", error.status())
                return
            for change in changes:
                version = change.resource_version
                self._send_change(route, matches, change)

    def _send_change(self, route: Route, matches: Any, change: Change) -> None:
        if change.plural != route.plural or route.namespace not in (
            None,
            change.namespace,
        ):
            return
        now_matches = matches(change.obj)
        before = change.previous is not None and matches(change.previous)
        kind = change.type
        if kind == "MODIFIED" and now_matches != before:
            kind = "ADDED" if now_matches else "DELETED"
        elif not now_matches:
            return
        self._event(kind, change.obj)

    def _event(self, kind: str, obj: Object) -> None:
        self._chunk(json.dumps({"type": kind, "object": obj}).encode() + b"\n")

    def _log(self, route: Route, query: dict[str, str]) -> None:
        if route.plural != "pods" or route.name is None:
            raise no_route()
        namespace, name = str(route.namespace), route.name
        pod = self.kube.store.get("pods", namespace, name)
        containers = [c["name"] for c in pod["spec"]["containers"]]
        container = query.get("container") or containers[0]
        if container not in containers:
            raise bad_request(f"container {container} is not valid for pod {name}")
        if len(containers) > 1 and "container" not in query:
            raise bad_request(
                f"a container name must be specified for pod {name}, "
                f"choose one of: {containers}"
            )
        runtime = self.kube.cluster.runtime(namespace, name)
        if runtime is None or runtime.process is None:
            statuses = pod["status"].get("containerStatuses") or [{}]
            reason = (
                statuses[0]
                .get("state", {})
                .get("waiting", {})
                .get("reason", "ContainerCreating")
            )
            raise bad_request(
                f'container "{container}" in pod "{name}" is waiting to start: {reason}'
            )
        stream = query.get("stream", "All")
        if not _flag(query, "follow"):
            data, _ = runtime.log.read(0, stream)
            tail = _integer(query, "tailLines")
            if tail is not None:
                data = b"".join(data.splitlines(keepends=True)[-tail:]) if tail else b""
            self._send_text(data)
            return
        self._follow_log(runtime.log, stream)

    def _follow_log(self, log: Any, stream: str) -> None:
        self._start_stream("text/plain")
        position = 0
        while not self.kube.store.closed:
            more = log.wait(position, 0.5)
            data, position = log.read(position, stream)
            if data:
                self._chunk(data)
            if not more and log.closed:
                break
        self._end_stream()
