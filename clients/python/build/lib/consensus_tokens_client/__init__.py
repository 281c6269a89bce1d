"""Python client for the Consensus Tokens API (reserve, run, settle; retry-safe; batched).

    from consensus_tokens_client import Client

    client = Client("https://tokens.example.com", api_key="...")
    est = client.estimate(operation_type="consensus", topic=prompt)
    with client.operation(user_id=42, operation_type="consensus", estimate=est.tokens) as op:
        answer = call_the_model(prompt)
        op.settle(answer.usage.total_tokens)
"""
from .aio import AsyncClient, AsyncOperation
from .client import Client, Operation
from .errors import (AuthenticationFailed, BatchTooLarge, ConnectionFailed, ConsensusTokensError,
                     DuplicateOperation, DuplicateReservation, InvalidRequest, MalformedJson, MethodNotAllowed,
                     NotAuthenticated, NotFound, OperationClosed, OperationIdConflict, PayloadTooLarge,
                     PermissionDenied, RateLimited, ReservationExpired, ReservationNotFound, ReservationSettled,
                     ServerError, ServiceUnavailable, TokenCapExceeded, UnknownOperationType, UnknownProvider,
                     UnknownUser, UnsupportedMediaType, UriTooLong)
from .models import (BatchItemResult, BatchResult, Check, ConsumeItem, Consumption, DailyUsage, Estimate,
                     HistoryEntry, MonthlyReport, OperationTotal, Overage, Release, Reservation, Usage)
from .protocol import new_operation_id
from .recorder import AsyncBatchRecorder, BatchRecorder, ItemFailure
from .retry import RetryPolicy
from .version import __version__

__all__ = [
    "AsyncBatchRecorder", "AsyncClient", "AsyncOperation", "AuthenticationFailed", "BatchItemResult", "BatchRecorder",
    "BatchResult", "BatchTooLarge", "Check", "Client", "ConnectionFailed", "ConsensusTokensError", "ConsumeItem",
    "Consumption", "DailyUsage", "DuplicateOperation", "DuplicateReservation", "Estimate", "HistoryEntry",
    "InvalidRequest", "ItemFailure", "MalformedJson", "MethodNotAllowed", "MonthlyReport", "NotAuthenticated",
    "NotFound", "Operation", "OperationClosed", "OperationIdConflict", "OperationTotal", "Overage",
    "PayloadTooLarge", "PermissionDenied", "RateLimited", "Release", "Reservation", "ReservationExpired",
    "ReservationNotFound", "ReservationSettled", "RetryPolicy", "ServerError", "ServiceUnavailable",
    "TokenCapExceeded", "UnknownOperationType", "UnknownProvider", "UnknownUser", "UnsupportedMediaType",
    "UriTooLong", "Usage", "__version__", "new_operation_id",
]
