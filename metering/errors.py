"""Metering's domain errors: each has the stable code and HTTP status the API answers with
(consensus_tokens/errors.py turns any ApplicationError into the documented error body)."""
from __future__ import annotations

from consensus_tokens.errors import ApplicationError


class UnknownUser(ApplicationError):
    status, code = 404, "unknown_user"


class UnknownOperationType(ApplicationError):
    status, code = 400, "unknown_operation_type"


class UnknownProvider(ApplicationError):
    status, code = 400, "unknown_provider"


class TokenCapExceeded(ApplicationError):
    status, code = 402, "token_cap_exceeded"


class OperationIdConflict(ApplicationError):
    status, code = 409, "operation_id_conflict"


class ReservationNotFound(ApplicationError):
    status, code = 404, "reservation_not_found"


class ReservationExpired(ApplicationError):
    """The hold is no longer held: it expired (or, for a consume, was released or settled)."""
    status, code = 409, "reservation_expired"


class ReservationSettled(ApplicationError):
    """A release of a hold a consume has already settled: its tokens are spent, not held."""
    status, code = 409, "reservation_settled"
