"""Application errors with stable codes, and the one DRF exception handler that
turns every error into {"error": {"code", "message", "fields"?}}."""
from __future__ import annotations

import logging
from typing import Any

from django.conf import settings
from django.core.exceptions import PermissionDenied as DjangoPermissionDenied
from django.core.exceptions import RequestDataTooBig, TooManyFieldsSent, TooManyFilesSent
from django.core.exceptions import ValidationError as DjangoValidationError
from django.db import DatabaseError, InterfaceError, OperationalError
from django.http import Http404
from rest_framework import exceptions as drf
from rest_framework.response import Response

logger = logging.getLogger(__name__)


class ApplicationError(Exception):
    status = 400
    code = "invalid_request"

    def __init__(self, message: str, *, code: str | None = None, status: int | None = None,
                 extra: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code:
            self.code = code
        if status:
            self.status = status
        self.extra = extra or {}


def error_body(code: str, message: str, fields: dict[str, Any] | None = None,
               extra: dict[str, Any] | None = None) -> dict[str, Any]:
    error: dict[str, Any] = {"code": code, "message": message}
    if fields:
        error["fields"] = fields
    if extra:
        error.update(extra)
    return {"error": error}


def payload_too_large_body() -> dict[str, Any]:
    return error_body("payload_too_large", f"The body is larger than {settings.DATA_UPLOAD_MAX_MEMORY_SIZE} bytes.")


def _flatten(detail: Any) -> Any:
    if isinstance(detail, dict):
        return {k: _flatten(v) for k, v in detail.items()}
    if isinstance(detail, list):
        if all(isinstance(d, str) for d in detail):
            return [str(d) for d in detail]
        return [_flatten(d) for d in detail]
    return str(detail)


def validation_fields(detail: Any) -> dict[str, Any]:
    """A DRF ValidationError's detail as the error body's `fields`."""
    return _flatten(detail) if isinstance(detail, dict) else {"nonFieldErrors": _flatten(detail)}


def exception_handler(exc: Exception, context: dict[str, Any]) -> Response | None:
    if isinstance(exc, ApplicationError):
        return Response(error_body(exc.code, exc.message, extra=exc.extra), status=exc.status)
    if isinstance(exc, DjangoValidationError):
        fields = exc.message_dict if hasattr(exc, "error_dict") else {"nonFieldErrors": exc.messages}
        return Response(error_body("invalid_request", "Invalid input.", fields), status=400)
    if isinstance(exc, RequestDataTooBig):  # a body without Content-Length (request_limits.py checks the rest)
        return Response(payload_too_large_body(), status=413)
    if isinstance(exc, (TooManyFieldsSent, TooManyFilesSent)):
        return Response(error_body("invalid_request", str(exc)), status=400)
    if isinstance(exc, (OperationalError, InterfaceError)):
        logger.exception("database unavailable")
        response = Response(error_body("service_unavailable", "The database is unavailable; retry shortly."),
                            status=503)
        response["Retry-After"] = "1"
        return response
    if isinstance(exc, Http404):
        exc = drf.NotFound()
    elif isinstance(exc, DjangoPermissionDenied):
        exc = drf.PermissionDenied()

    from rest_framework.views import exception_handler as drf_exception_handler  # avoids an import cycle

    response = drf_exception_handler(exc, context)
    if response is None:
        if isinstance(exc, DatabaseError):
            logger.exception("database error")
        return None
    codes = {
        drf.ValidationError: "invalid_request",
        drf.ParseError: "malformed_json",
        drf.NotAuthenticated: "not_authenticated",
        drf.AuthenticationFailed: "authentication_failed",
        drf.PermissionDenied: "permission_denied",
        drf.NotFound: "not_found",
        drf.MethodNotAllowed: "method_not_allowed",
        drf.UnsupportedMediaType: "unsupported_media_type",
        drf.Throttled: "rate_limited",
        drf.NotAcceptable: "not_acceptable",
    }
    code = next((c for cls, c in codes.items() if isinstance(exc, cls)), "error")
    if isinstance(exc, drf.ValidationError):
        response.data = error_body(code, "Invalid input.", validation_fields(exc.detail))
    else:
        response.data = error_body(code, str(exc.detail) if hasattr(exc, "detail") else str(exc))
    return response
