"""Errors the server answers with, in OpenAI's shape.

Every failure a client can cause or meet becomes one JSON body

    {"error": {"message": "...", "type": "...", "param": "...", "code": "..."}}

with a 4xx status (5xx only for a timeout, an overloaded or stopping
server, or a bug, whose traceback goes to the server log, never to the
client). OpenAI's clients read this shape and raise ``openai.BadRequestError``
and friends with the message.
"""

from __future__ import annotations

from typing import Any

# HTTP status -> OpenAI error type
_TYPES = {
    400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
    405: "invalid_request_error", 413: "invalid_request_error", 415: "invalid_request_error",
    429: "rate_limit_error", 500: "server_error", 503: "server_error", 504: "server_error",
}


class APIError(Exception):
    """An answer other than success: HTTP `status`, a message a person can act on, the
    request field at fault (`param`, e.g. ``"texts[3]"``) and a stable machine-readable `code`."""

    def __init__(self, status: int, message: str, code: str, param: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.headers = headers or {}

    @property
    def type(self) -> str:
        return _TYPES.get(self.status, "invalid_request_error" if self.status < 500 else "server_error")

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str = "invalid_value") -> APIError:
    return APIError(400, message, code, param)
