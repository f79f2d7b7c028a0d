"""Errors in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``.

Every failure the server answers goes through ``APIError``, so clients (the ``openai``
SDK raises ``BadRequestError``, ``RateLimitError``, ... from the status) and people
read the same JSON: a 400 names the offending field in ``param`` and in the message.
"""

from __future__ import annotations

import json
import re

from pydantic import ValidationError
from starlette.responses import JSONResponse

# Union branches and validator wrappers pydantic adds to an error's ``loc``; they are
# not field names a client wrote.
_TAGS = {"str", "int", "float", "bool", "none"}
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class APIError(Exception):
    """An HTTP error answered as OpenAI's error JSON."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message = status, message
        self.type, self.param, self.code = type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        error = {"message": self.message, "type": self.type, "param": self.param, "code": self.code}
        return {"error": error}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)

    def sse(self) -> str:
        """The error as one Server-Sent Event (a failure after a stream's headers)."""
        return f"data: {json.dumps(self.body())}\n\n"


def _param(loc: tuple) -> str:
    """``("messages", 0, "role")`` -> ``"messages[0].role"``, union tags dropped."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in _TAGS or not _IDENT.match(str(part)):
            break  # a union branch: the field is what came before it
        else:
            out += f".{part}" if out else part
    return out


def from_validation(e: ValidationError) -> APIError:
    """A 400 naming the first invalid field (pydantic reports every union branch)."""
    first = e.errors()[0]
    param = _param(tuple(first["loc"])) or None
    message = first["msg"]
    if first["type"] == "missing":
        message = "field required"
    text = f"{param}: {message}" if param else message
    return APIError(400, text, param=param, code="invalid_value")


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)
