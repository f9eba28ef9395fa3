"""Typed errors: each carries the daemon's stable error code and message."""

from __future__ import annotations

from typing import Optional


class DeltaBoxError(Exception):
    """An error the daemon reported (`code` is stable; match on it), or a transport failure (`code` None)."""

    def __init__(self, message: str, code: Optional[str] = None, status: Optional[int] = None):
        super().__init__(message)
        self.message = message
        self.code = code
        self.status = status

    def __repr__(self) -> str:
        return f"{type(self).__name__}(code={self.code!r}, status={self.status!r}, message={self.message!r})"


class NotFoundError(DeltaBoxError):
    """Unknown sandbox, checkpoint, session, file or endpoint (HTTP 404)."""


class InvalidRequestError(DeltaBoxError):
    """Bad input: malformed body, wrong types, a path escaping the sandbox, a limit exceeded (HTTP 400/413)."""


class ConflictError(DeltaBoxError):
    """The request does not fit the current state: sandbox not running, paused, checkpoint of another
    sandbox, session ended (HTTP 409)."""


class AuthenticationError(DeltaBoxError):
    """Missing or wrong bearer token (HTTP 401)."""


class ServerError(DeltaBoxError):
    """The daemon failed (HTTP 5xx)."""


class TimeoutError(DeltaBoxError):  # noqa: A001 - E2B's name
    """A command or the HTTP request itself timed out."""


def from_response(status: int, body: object) -> DeltaBoxError:
    code = None
    message = f"HTTP {status}"
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        code = body["error"].get("code")
        message = body["error"].get("message") or message
    elif isinstance(body, str) and body:
        message = body
    cls: type
    if status == 404:
        cls = NotFoundError
    elif status == 401:
        cls = AuthenticationError
    elif status == 409:
        cls = ConflictError
    elif 400 <= status < 500:
        cls = InvalidRequestError
    else:
        cls = ServerError
    return cls(message, code=code, status=status)
