"""Errors in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, never a bare 5xx.

Validation problems (including malformed JSON) become 400 with the offending field in
`param`; a field no request model declares is OpenAI's "Unrecognized request argument
supplied". The handlers are installed on the app by `install`. Messages never quote the
client's input (it may not even be encodable: a lone surrogate).
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 405: "invalid_request_error", 413: "invalid_request_error",
          422: "invalid_request_error", 429: "rate_limit_error", 503: "service_unavailable"}


class APIError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": _TYPES.get(status, "server_error"), "param": param,
                      "code": code}}


def error_response(err: APIError) -> JSONResponse:
    return JSONResponse(error_body(err.status, err.message, err.param, err.code), status_code=err.status,
                        headers=err.headers)


def _param(loc: tuple) -> str | None:
    parts = [str(p) for p in loc if p != "body"]
    # Drop pydantic's union-branch tags such as 'str' or 'list[int]'.
    parts = [p for p in parts if not (p[0].isalpha() and ("[" in p or p in {"str", "int", "float", "bool"}))]
    return ".".join(parts) or None


def install(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError):
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError):
        errors = exc.errors()
        # For a union (prompt: str | list[int] | ...) a validator's own error is from the branch the
        # value's type matched, so it wins; otherwise the deepest error is the informative one.
        first = max(errors, key=lambda e: (e.get("type") == "value_error", len(e.get("loc", ()))),
                    default={"loc": (), "msg": "invalid request"})
        if any(e.get("type") == "json_invalid" for e in errors):
            return error_response(APIError(400, "We could not parse the JSON body of your request.",
                                           code="invalid_json"))
        param = _param(tuple(first.get("loc", ())))
        if first.get("type") == "extra_forbidden":
            return error_response(APIError(400, f"Unrecognized request argument supplied: {param}", param=param,
                                           code="unrecognized_argument"))
        msg = f"{param}: {first.get('msg')}" if param else str(first.get("msg"))
        return error_response(APIError(400, msg, param=param, code="invalid_value"))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException):
        return error_response(APIError(exc.status_code, str(exc.detail)))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception):
        log.exception("Unhandled error")
        return error_response(APIError(500, "internal error"))
