"""One error hierarchy; every error leaves the server as OpenAI-shaped JSON:
``{"error": {"message", "type", "param", "code"}}``."""

from __future__ import annotations

from typing import Any


class PowerserveError(Exception):
    status_code = 500
    error_type = "internal_error"

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.error_type, self.param, self.code)


class BadRequestError(PowerserveError):
    status_code = 400
    error_type = "invalid_request_error"


class AuthenticationError(PowerserveError):
    status_code = 401
    error_type = "authentication_error"


class NotFoundError(PowerserveError):
    status_code = 404
    error_type = "not_found_error"


class RateLimitError(PowerserveError):
    status_code = 429
    error_type = "rate_limit_error"


class RequestTimeoutError(PowerserveError):
    """The request's deadline passed; its engine work was stopped."""

    status_code = 504
    error_type = "timeout_error"


class ServiceUnavailableError(PowerserveError):
    status_code = 503
    error_type = "service_unavailable"


class RequestCancelled(Exception):
    """The client went away; the work was stopped (no response is sent)."""


def error_body(message: str, error_type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}
