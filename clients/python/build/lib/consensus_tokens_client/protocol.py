"""The API's requests and the reading of its answers, without any I/O.

Client and AsyncClient differ only in how they wait and send; each method builds a `Call` here
(method, path, body, and how to read a success) and hands it to the client's send loop, which
asks `interpret` what an answer means: a result, a retry, or an error to raise.
"""
from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any, Callable, Generic, TypeVar
from urllib.parse import parse_qs, urlsplit

import httpx

from .errors import ConnectionFailed, ConsensusTokensError, TokenCapExceeded, error_from_answer
from .models import (BatchResult, Check, ConsumeItem, Consumption, DailyUsage, Estimate, HistoryEntry,
                     MonthlyReport, Release, Reservation, Usage)
from .retry import RetryPolicy, parse_retry_after

T = TypeVar("T")

API = "/api/tokens"


def new_operation_id() -> str:
    """A fresh operation id: made once per operation and sent with every retry of it."""
    return f"op_{uuid.uuid4().hex}"


@dataclass(frozen=True)
class Answer:
    status: int
    body: Any
    headers: httpx.Headers
    request_id: str | None


@dataclass(frozen=True)
class Call(Generic[T]):
    method: str
    path: str
    read: Callable[[Answer], T]
    json: Any = None
    params: dict[str, str] | None = None


@dataclass(frozen=True)
class Retry:
    """Send the call again after the policy's wait (`retry_after`: the server's floor)."""

    retry_after: float | None
    error: ConsensusTokensError


def answer_of(response: httpx.Response) -> Answer:
    try:
        body = response.json() if response.content else None
    except ValueError:  # a proxy's HTML page, a truncated body
        body = None
    return Answer(status=response.status_code, body=body, headers=response.headers,
                  request_id=response.headers.get("X-Request-ID"))


def interpret(call: Call[T], response: httpx.Response, policy: RetryPolicy, *, last: bool) -> T | Retry:
    """A success read by the call; a Retry if the policy repeats this answer; else raises its error."""
    answer = answer_of(response)
    if answer.status < 400:
        return call.read(answer)
    retry_after = parse_retry_after(answer.headers.get("Retry-After"))
    error = error_from_answer(answer.status, answer.body, request_id=answer.request_id, retry_after=retry_after)
    if not last and policy.retries_status(answer.status, retry_after):
        return Retry(retry_after, error)
    raise error


def connection_failed(error: Exception, call: Call[Any], attempts: int) -> ConnectionFailed:
    return ConnectionFailed(f"No answer to {call.method} {call.path} after {attempts} attempt(s): "
                            f"{type(error).__name__}: {error}")


# --- the calls ---------------------------------------------------------------------------------------

def _body(answer: Answer) -> dict[str, Any]:
    if not isinstance(answer.body, dict):
        raise ConsensusTokensError(f"HTTP {answer.status} without a JSON object.", code="invalid_answer",
                                   status=answer.status, request_id=answer.request_id)
    return answer.body


def _drop_unset(values: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in values.items() if v is not None}


def _when(value: date | datetime | str | None, name: str) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, datetime) and value.tzinfo is None:
        raise ValueError(f"{name} must be timezone-aware (a naive datetime's zone would be a guess)")
    return value.isoformat()


def estimate(*, operation_type: str, topic: str, sources: Sequence[str] = (), provider: str = "openai",
             model: str | None = None, user_id: int | None = None) -> Call[Estimate]:
    body = _drop_unset({"userId": user_id, "operationType": operation_type, "provider": provider, "model": model,
                        "topic": topic, "sources": list(sources)})
    return Call("POST", f"{API}/estimate", lambda a: Estimate.from_api(_body(a)), json=body)


def check(*, user_id: int | None, tokens: int, operation_type: str = "") -> Call[Check]:
    body = _drop_unset({"userId": user_id, "tokens": tokens, "operationType": operation_type or None})
    return Call("POST", f"{API}/check", lambda a: Check.from_api(_body(a)), json=body)


def reserve(*, user_id: int, tokens: int, operation_type: str = "", operation_id: str,
            ttl_seconds: int | None = None) -> Call[Reservation]:
    body = _drop_unset({"userId": user_id, "tokens": tokens, "operationType": operation_type or None,
                        "reserve": True, "operationId": operation_id, "ttlSeconds": ttl_seconds})

    def read(answer: Answer) -> Reservation:
        data = _body(answer)
        if not data.get("reservationId"):  # the hold did not fit: the API says so in a 200 (sufficient: false)
            raise TokenCapExceeded(f"No room to hold {tokens} tokens (available {data.get('available')}).",
                                   status=answer.status, request_id=answer.request_id,
                                   details={"code": TokenCapExceeded.code, "available": data.get("available"),
                                            "cap": data.get("cap"), "overage": data.get("overage")})
        return Reservation.from_api(data, user_id=user_id, operation_id=operation_id, tokens=tokens)

    return Call("POST", f"{API}/check", read, json=body)


def consume(*, item: ConsumeItem) -> Call[Consumption]:
    def read(answer: Answer) -> Consumption:
        return Consumption.from_api(_body(answer), replayed=answer.headers.get("Idempotent-Replayed") == "true",
                                    request_id=answer.request_id)

    return Call("POST", f"{API}/consume", read, json=item.to_api())


def consume_batch(*, items: Sequence[ConsumeItem]) -> Call[BatchResult]:
    return Call("POST", f"{API}/consume/batch",
                lambda a: BatchResult.from_api(_body(a), request_id=a.request_id),
                json={"operations": [item.to_api() for item in items]})


def release(*, user_id: int, reservation_id: uuid.UUID | str) -> Call[Release]:
    return Call("POST", f"{API}/release", lambda a: Release.from_api(_body(a)),
                json={"userId": user_id, "reservationId": str(reservation_id)})


def usage(*, user_id: int | None) -> Call[Usage]:
    return Call("GET", f"{API}/usage", lambda a: Usage.from_api(_body(a)), params=_params(userId=user_id))


def _params(**values: Any) -> dict[str, str]:
    return {k: str(v) for k, v in values.items() if v is not None}


@dataclass(frozen=True)
class HistoryPage:
    entries: list[HistoryEntry]
    cursor: str | None  # the next page's, None on the last page


def history_page(*, user_id: int | None, since: date | datetime | str | None, until: date | datetime | str | None,
                 operation_type: str | None, kind: str | None, page_size: int | None,
                 cursor: str | None) -> Call[HistoryPage]:
    def read(answer: Answer) -> HistoryPage:
        data = _body(answer)
        following = None
        if data.get("next"):
            # only the cursor is taken from `next`: its host is the server's view of itself,
            # which behind a proxy may not be the address this client uses
            following = parse_qs(urlsplit(data["next"]).query).get("cursor", [None])[0]
        return HistoryPage([HistoryEntry.from_api(e) for e in data["results"]], following)

    params = _params(userId=user_id, operationType=operation_type, kind=kind, pageSize=page_size, cursor=cursor,
                     **{"from": _when(since, "since"), "to": _when(until, "until")})
    return Call("GET", f"{API}/history", read, params=params)


def analytics_daily(*, user_id: int | None, since: date | None, until: date | None,
                    group_by: str | None) -> Call[list[DailyUsage]]:
    def read(answer: Answer) -> list[DailyUsage]:
        if not isinstance(answer.body, list):
            raise ConsensusTokensError("The daily analytics answer is not a list.", code="invalid_answer",
                                       status=answer.status, request_id=answer.request_id)
        return [DailyUsage.from_api(row) for row in answer.body]

    params = _params(userId=user_id, groupBy=group_by, **{"from": _when(since, "since"), "to": _when(until, "until")})
    return Call("GET", f"{API}/analytics/daily", read, params=params)


def report_monthly(*, user_id: int | None, month: str | date | None) -> Call[MonthlyReport]:
    if isinstance(month, date):
        month = f"{month.year:04d}-{month.month:02d}"
    return Call("GET", f"{API}/reports/monthly", lambda a: MonthlyReport.from_api(_body(a)),
                params=_params(userId=user_id, month=month))


# --- batches that meet a refused item -----------------------------------------------------------------

def refused_item(error: ConsensusTokensError, count: int) -> int | None:
    """The index of the item that made the server refuse a whole batch, when the error names one
    (a 402 for one user's cap, an invalid item): without it the rest can be sent again."""
    index = error.details.get("index")
    if isinstance(index, int) and not isinstance(index, bool) and 0 <= index < count:
        return index
    return None
