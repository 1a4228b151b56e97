"""The one error hierarchy of peermesh, shared by the node and the peer library.

    MeshError
    ├── ApiError                    an HTTP request the node refuses (with status and code)
    │   ├── BadRequest              400: malformed JSON, wrong types, unknown fields
    │   ├── Unauthorized            401: wrong or missing bearer token
    │   ├── Forbidden               403: a path that leaves the workspace
    │   ├── NotFound                404: unknown id or path
    │   ├── Conflict                409: the resource is in the wrong state for the request
    │   ├── PayloadTooLarge         413: body over the node's limit
    │   └── Unavailable             503: the node is shutting down or lacks a capability
    ├── PeerError                   talking to another node went wrong (carries url, task id)
    │   ├── PeerUnreachable         no connection could be made (also a ConnectionError)
    │   ├── PeerGone                the node existed and is gone: removed, crashed, stopped
    │   ├── PeerAuthError           the peer refused our token
    │   ├── PeerRequestError        the peer answered with an error body
    │   └── TaskFailed              a task ended failed, cancelled or interrupted
    ├── SpawnError                  a node could not be created or did not become ready
    ├── ConfigError                 invalid configuration or topology (the caller's fault)
    └── ToolError                   a tool call that cannot run as asked (told to the model)

Errors are named by who is at fault, so callers can branch on that: an ApiError is the
caller's request, a PeerError is the other node or the network between us, a ToolError is
the model's call.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "ApiError",
    "BadRequest",
    "ConfigError",
    "Conflict",
    "Forbidden",
    "MeshError",
    "NotFound",
    "PayloadTooLarge",
    "PeerAuthError",
    "PeerError",
    "PeerGone",
    "PeerRequestError",
    "PeerUnreachable",
    "SpawnError",
    "TaskFailed",
    "ToolError",
    "Unauthorized",
    "Unavailable",
]


class MeshError(Exception):
    """Root of every error peermesh raises on purpose."""


class ApiError(MeshError):
    """A request the node refuses; rendered as {"error": {"code", "message", "details"}}."""

    status = 400
    code = "bad_request"

    def __init__(self, message: str, *, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details or {}

    def to_body(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message, "details": self.details}}


class BadRequest(ApiError, ValueError):
    status = 400
    code = "bad_request"


class Unauthorized(ApiError, PermissionError):
    status = 401
    code = "unauthorized"


class Forbidden(ApiError, PermissionError):
    status = 403
    code = "forbidden"


class NotFound(ApiError, LookupError):
    status = 404
    code = "not_found"


class Conflict(ApiError):
    status = 409
    code = "conflict"


class PayloadTooLarge(ApiError):
    status = 413
    code = "payload_too_large"


class Unavailable(ApiError):
    status = 503
    code = "unavailable"


class PeerError(MeshError):
    """Something went wrong talking to another node."""

    def __init__(self, message: str, *, url: str, task_id: str | None = None) -> None:
        where = f"{url} (task {task_id})" if task_id else url
        super().__init__(f"{message} [{where}]")
        self.reason = message
        self.url = url
        self.task_id = task_id


class PeerUnreachable(PeerError, ConnectionError):
    """No connection could be made to the node."""


class PeerGone(PeerError):
    """The node existed and is gone (removed, crashed or stopped)."""


class PeerAuthError(PeerError, PermissionError):
    """The node refused our token."""


class PeerRequestError(PeerError):
    """The node answered a request with an error body."""

    def __init__(
        self,
        message: str,
        *,
        url: str,
        status: int,
        code: str,
        details: dict[str, Any] | None = None,
        task_id: str | None = None,
    ) -> None:
        super().__init__(message, url=url, task_id=task_id)
        self.status = status
        self.code = code
        self.details = details or {}


class TaskFailed(PeerError):
    """A task ended in a state other than completed."""

    def __init__(self, message: str, *, url: str, task_id: str, status: str) -> None:
        super().__init__(message, url=url, task_id=task_id)
        self.status = status


class SpawnError(MeshError):
    """A node could not be created, or it did not become ready."""


class ConfigError(MeshError, ValueError):
    """Invalid configuration or topology."""


class ToolError(MeshError):
    """A tool call that cannot run as asked; its message goes back to the model."""
