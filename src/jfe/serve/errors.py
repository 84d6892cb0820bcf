"""The service's one error shape: ``{"error": {"message", "type", "param", "code"}}`` with the status code
(OpenAI's; ``code`` is a string where OpenAI names one, e.g. ``model_not_found``, else the status).

:class:`ApiError` is what the input checks and the routes raise; :func:`add_error_handlers` makes every
other failure (validation, unknown route, JFE's own errors) answer in the same shape.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from jfe.errors import JFEError

log = logging.getLogger("jfe.serve")


class ApiError(Exception):
    """An error the client caused (or may see): rendered as JSON with its status code."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 headers: dict[str, str] | None = None, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.headers = status, message, type_, headers
        self.param, self.code = param, code


def error_response(status: int, message: str, type_: str, headers: dict[str, str] | None = None, *,
                   param: str | None = None, code: str | None = None) -> JSONResponse:
    """The JSON error body every failure of the service answers with."""
    return JSONResponse({"error": {"message": message, "type": type_, "param": param,
                                   "code": code if code is not None else status}},
                        status_code=status, headers=headers)


def validation_message(exc: ValidationError | RequestValidationError) -> str:
    """Pydantic's errors as one line: ``field.path: message; ...`` (the ``body`` prefix dropped)."""
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err.get("loc", ()) if p not in ("body",))
        parts.append(f"{loc}: {err.get('msg')}" if loc else str(err.get("msg")))
    return "; ".join(parts) or "invalid request"


OPENAI_PREFIX = "/v1/"


def _status_for(request: Request, status: int) -> int:
    """OpenAI's routes (``/v1/*``) answer a request they cannot process with 400, as OpenAI does (its client then
    raises ``BadRequestError``); the rest of the API keeps HTTP's 422 for a well-formed request it refuses."""
    return 400 if status == 422 and request.url.path.startswith(OPENAI_PREFIX) else status


def first_param(exc: ValidationError | RequestValidationError) -> str | None:
    """The request field the first validation error is about (OpenAI's ``param``), e.g. ``input`` or ``k``."""
    for err in exc.errors():
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        if loc:
            return loc[0]
    return None


async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    return error_response(_status_for(request, exc.status), exc.message, exc.type, exc.headers, param=exc.param,
                          code=exc.code)


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    return error_response(_status_for(request, 422), validation_message(exc), "invalid_request_error",
                          param=first_param(exc))


async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    return error_response(exc.status_code, str(exc.detail), "http_error", getattr(exc, "headers", None))


async def _jfe_error(request: Request, exc: JFEError) -> JSONResponse:
    # bad input the model or the data layer noticed (e.g. an item it cannot embed): the client's fault
    return error_response(_status_for(request, 422), str(exc), "invalid_input")


async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
    # a bug, not the client's fault: still the JSON shape (clients parse it), logged with its traceback
    log.error("unhandled error in a request", exc_info=exc)
    return error_response(500, "internal server error", "server_error")


def add_error_handlers(app: FastAPI) -> None:
    """Render :class:`ApiError`, request validation, HTTP and JFE errors, and any other failure (500), as the
    JSON error body."""
    app.add_exception_handler(Exception, _unexpected)
    app.add_exception_handler(ApiError, _api_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, _http_error)  # type: ignore[arg-type]
    app.add_exception_handler(JFEError, _jfe_error)  # type: ignore[arg-type]
