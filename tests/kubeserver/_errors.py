"""API errors, carried as exceptions and answered as ``Status`` objects."""

from __future__ import annotations

from typing import Any


class ApiError(Exception):
    """A request the API server refuses, with the ``Status`` it answers.

    Attributes:
        code: The HTTP status code.
        reason: The machine-readable ``Status.reason`` (``NotFound``, ``Invalid``…).
        details: The ``Status.details`` object.
    """

    def __init__(
        self,
        code: int,
        reason: str,
        message: str,
        details: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message
        self.details = details or {}

    def status(self) -> dict[str, Any]:
        """Return the ``Status`` object a real API server would send."""
        status: dict[str, Any] = {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        }
        if self.details:
            status["details"] = self.details
        return status


def resource_name(plural: str, group: str) -> str:
    """Return how Kubernetes names a resource in messages: ``jobs.batch``."""
    return f"{plural}.{group}" if group else plural


def not_found(plural: str, group: str, name: str) -> ApiError:
    """A 404 for an object that does not exist."""
    message = f'{resource_name(plural, group)} "{name}" not found'
    details = {"name": name, "group": group, "kind": plural}
    return ApiError(404, "NotFound", message, details)


def already_exists(plural: str, group: str, name: str) -> ApiError:
    """A 409 for a create whose name is taken."""
    message = f'{resource_name(plural, group)} "{name}" already exists'
    details = {"name": name, "group": group, "kind": plural}
    return ApiError(409, "AlreadyExists", message, details)


def no_route() -> ApiError:
    """A 404 for a path this server does not serve."""
    message = "the server could not find the requested resource"
    return ApiError(
        404,
        "NotFound",
        message,
        {
            "causes": [
                {"reason": "UnexpectedServerResponse", "message": "404 page not found"}
            ]
        },
    )


def bad_request(message: str) -> ApiError:
    """A 400 for a malformed request."""
    return ApiError(400, "BadRequest", message)


def method_not_allowed(method: str, what: str) -> ApiError:
    """A 405 for a verb this server does not support on a resource."""
    message = (
        "the server does not allow this method on the requested resource "
        f"({method} {what})"
    )
    return ApiError(405, "MethodNotAllowed", message)


def unauthorized() -> ApiError:
    """A 401 for a request without the kubeconfig's bearer token."""
    return ApiError(401, "Unauthorized", "Unauthorized")


def gone(requested: int, oldest: int) -> ApiError:
    """A 410 for a watch that asks for a compacted resourceVersion."""
    message = f"too old resource version: {requested} ({oldest})"
    return ApiError(410, "Expired", message)


class Invalid(ApiError):
    """A 422: the object breaks a validation rule.

    Attributes:
        causes: One ``{reason, message, field}`` per broken rule.
    """

    def __init__(
        self, kind: str, group: str, name: str, causes: list[dict[str, str]]
    ) -> None:
        qualified = f"{kind}.{group}" if group else kind
        summary = "; ".join(f"{cause['field']}: {cause['message']}" for cause in causes)
        if len(causes) > 1:
            summary = f"[{summary}]"
        message = f'{qualified} "{name}" is invalid: {summary}'
        details = {"name": name, "group": group, "kind": kind, "causes": causes}
        super().__init__(422, "Invalid", message, details)
        self.causes = causes
