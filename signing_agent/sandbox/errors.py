"""The sandbox's error type: an HTTP status plus a CCF OData error (code, message, optional details)."""

from __future__ import annotations

from typing import Any


class GovError(Exception):
    """A CCF-shaped error response: ``{"error":{"code":..,"message":..[,"details":[..]]}}``."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        details: list[dict[str, Any]] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details = details
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.details is not None:
            error["details"] = self.details
        return {"error": error}


def invalid_input(message: str) -> GovError:
    return GovError(400, "InvalidInput", message)


def internal_error(message: str) -> GovError:
    return GovError(500, "InternalError", message)
