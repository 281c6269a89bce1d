"""Errors: one base class, one subclass per API error code.

Every error the API answers with (`{"error": {"code", "message", "fields"?, ...}}`) is raised
as the subclass named after its code, carrying the code, the message, the per-field messages,
the HTTP status and the request id (`X-Request-ID`, for support). A code this version does not
know is raised as the base class with that code, so a newer server never breaks a caller.
"""
from __future__ import annotations

from typing import Any


class ConsensusTokensError(Exception):
    """The base of every error this client raises."""

    code: str = "error"

    def __init__(self, message: str, *, code: str | None = None, status: int | None = None,
                 fields: dict[str, Any] | None = None, request_id: str | None = None,
                 details: dict[str, Any] | None = None, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code:
            self.code = code
        self.status = status
        self.fields = fields or {}
        self.request_id = request_id
        self.details = details or {}  # the whole error object, anything beyond code/message/fields included
        self.retry_after = retry_after

    def __str__(self) -> str:
        where = f", request {self.request_id}" if self.request_id else ""
        return f"{self.code}: {self.message}{where}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}(code={self.code!r}, status={self.status!r}, message={self.message!r})"


# --- the API's codes (consensus_tokens/errors.py, metering/errors.py on the server) ---------------

class InvalidRequest(ConsensusTokensError):
    code = "invalid_request"


class MalformedJson(ConsensusTokensError):
    code = "malformed_json"


class NotAuthenticated(ConsensusTokensError):
    code = "not_authenticated"


class AuthenticationFailed(ConsensusTokensError):
    code = "authentication_failed"


class PermissionDenied(ConsensusTokensError):
    code = "permission_denied"


class NotFound(ConsensusTokensError):
    code = "not_found"


class MethodNotAllowed(ConsensusTokensError):
    code = "method_not_allowed"


class UnsupportedMediaType(ConsensusTokensError):
    code = "unsupported_media_type"


class PayloadTooLarge(ConsensusTokensError):
    code = "payload_too_large"


class UriTooLong(ConsensusTokensError):
    code = "uri_too_long"


class UnknownUser(ConsensusTokensError):
    code = "unknown_user"


class UnknownOperationType(ConsensusTokensError):
    code = "unknown_operation_type"


class UnknownProvider(ConsensusTokensError):
    code = "unknown_provider"


class TokenCapExceeded(ConsensusTokensError):
    """The user's cap leaves no room for these tokens: nothing was recorded or held."""

    code = "token_cap_exceeded"

    @property
    def available(self) -> int | None:
        value = self.details.get("available")
        return value if isinstance(value, int) else None

    @property
    def cap(self) -> int | None:
        value = self.details.get("cap")
        return value if isinstance(value, int) else None


class OperationIdConflict(ConsensusTokensError):
    """The operation id was already used for a different consume (other tokens or user)."""

    code = "operation_id_conflict"


class DuplicateOperation(ConsensusTokensError):
    code = "duplicate_operation"


class DuplicateReservation(ConsensusTokensError):
    code = "duplicate_reservation"


class BatchTooLarge(ConsensusTokensError):
    code = "batch_too_large"


class ReservationNotFound(ConsensusTokensError):
    code = "reservation_not_found"


class ReservationExpired(ConsensusTokensError):
    code = "reservation_expired"


class ReservationSettled(ConsensusTokensError):
    code = "reservation_settled"


class RateLimited(ConsensusTokensError):
    """Over a rate limit; `retry_after` says in how many seconds the window reopens."""

    code = "rate_limited"


class ServiceUnavailable(ConsensusTokensError):
    code = "service_unavailable"


class ServerError(ConsensusTokensError):
    code = "server_error"


# --- raised by the client itself -------------------------------------------------------------------

class ConnectionFailed(ConsensusTokensError):
    """No answer after every retry (refused, reset or timed out). A write may or may not have
    been recorded: repeat it with the same operation id to find out (it is then replayed)."""

    code = "connection_failed"


class OperationClosed(ConsensusTokensError):
    """settle() or release() on an operation that was already settled or released."""

    code = "operation_closed"


ERRORS_BY_CODE: dict[str, type[ConsensusTokensError]] = {
    cls.code: cls for cls in ConsensusTokensError.__subclasses__()}

# A body that is not the API's error shape (a proxy's page): the status says what happened.
_CODE_OF_STATUS = {401: "authentication_failed", 403: "permission_denied", 404: "not_found", 413: "payload_too_large",
                   414: "uri_too_long", 429: "rate_limited", 502: "bad_gateway", 503: "service_unavailable",
                   504: "gateway_timeout"}


def error_from_answer(status: int, body: Any, *, request_id: str | None,
                      retry_after: float | None) -> ConsensusTokensError:
    """The exception for an error answer: the subclass named after its code."""
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict) and isinstance(error.get("code"), str):
        code = error["code"]
        message = str(error.get("message") or code)
        fields = error.get("fields") if isinstance(error.get("fields"), dict) else None
        details = error
    else:
        code = _CODE_OF_STATUS.get(status, "server_error" if status >= 500 else "http_error")
        message, fields, details = f"HTTP {status} without an API error body.", None, {}
    cls = ERRORS_BY_CODE.get(code, ConsensusTokensError)
    return cls(message, code=code, status=status, fields=fields, request_id=request_id, details=details,
               retry_after=retry_after)
