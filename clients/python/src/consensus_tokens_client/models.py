"""The API's answers as typed, immutable dataclasses.

Field names are Python's (snake_case) for the API's camelCase; money is `Decimal` (never a
float), times are timezone-aware `datetime`s in UTC, ids of holds are `uuid.UUID`. Each
`from_api` reads one JSON object as the server documents it (/api/schema/).
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import date, datetime, timezone
from decimal import Decimal
from typing import Any


def parse_time(value: str) -> datetime:
    """An ISO 8601 time from the API as an aware UTC datetime ("Z" read on Python 3.10 too)."""
    parsed = datetime.fromisoformat(value[:-1] + "+00:00" if value.endswith("Z") else value)
    if parsed.tzinfo is None:  # the API always sends an offset; never guess a naive one's zone
        raise ValueError(f"time without a UTC offset: {value!r}")
    return parsed.astimezone(timezone.utc)


def _decimal(value: Any) -> Decimal:
    # str() first: a JSON number arrives as a float, whose binary value is not the decimal one sent
    return Decimal(str(value))


@dataclass(frozen=True, slots=True)
class Estimate:
    tokens: int
    base_tokens: int
    content_tokens: int
    provider: str
    encoding: str
    method: str  # how the content was counted: "exact" (the provider's tokenizer) or "calibrated"
    cached: bool
    # The content's script (latin, code, cyrillic, cjk, other) and how many settled operations the
    # calibration used has learnt from; None from a server that does not say. Pass the estimate to
    # operation() (or script_class= to consume) so the server's estimates learn from the settlement.
    script_class: str | None
    calibration_samples: int | None
    raw: dict[str, Any] = field(repr=False, compare=False)  # the whole answer, fields this version does not know included

    @classmethod
    def from_api(cls, body: dict[str, Any]) -> Estimate:
        breakdown = body.get("breakdown") or {}
        return cls(tokens=body["tokens"], base_tokens=breakdown.get("base", 0),
                   content_tokens=breakdown.get("content", 0), provider=body["provider"],
                   encoding=body.get("encoding", ""), method=body.get("method", ""), cached=bool(body.get("cached")),
                   script_class=body.get("scriptClass"), calibration_samples=body.get("calibrationSamples"), raw=body)


@dataclass(frozen=True, slots=True)
class Check:
    """Whether `tokens` fit now (nothing is held)."""

    sufficient: bool
    available: int
    overage: int  # how many of the tokens would land past the plan's limit (billed as overage)
    cap: int

    @classmethod
    def from_api(cls, body: dict[str, Any]) -> Check:
        return cls(sufficient=body["sufficient"], available=body["available"], overage=body["overage"],
                   cap=body["cap"])


@dataclass(frozen=True, slots=True)
class Reservation:
    """A hold of `tokens` for one operation, until `expires_at` or its settle/release."""

    reservation_id: uuid.UUID
    user_id: int
    operation_id: str
    tokens: int
    expires_at: datetime
    available: int  # what the user has left after the hold
    overage: int
    cap: int

    @classmethod
    def from_api(cls, body: dict[str, Any], *, user_id: int, operation_id: str, tokens: int) -> Reservation:
        return cls(reservation_id=uuid.UUID(body["reservationId"]), user_id=user_id, operation_id=operation_id,
                   tokens=tokens, expires_at=parse_time(body["expiresAt"]), available=body["available"],
                   overage=body["overage"], cap=body["cap"])


@dataclass(frozen=True, slots=True)
class Overage:
    tokens: int
    charge: Decimal  # in the account's currency (USD), exact


@dataclass(frozen=True, slots=True)
class Usage:
    tier: str | None
    limit: int
    used: int
    reserved: int
    remaining: int
    available: int
    usage_percentage: float  # a display figure, not money
    status: str  # low, moderate, warning, critical, exceeded
    cap: int
    overage: Overage
    period_start: datetime
    period_end: datetime

    @classmethod
    def from_api(cls, body: dict[str, Any]) -> Usage:
        overage = body.get("overage") or {}
        return cls(tier=body.get("tier"), limit=body["limit"], used=body["used"], reserved=body["reserved"],
                   remaining=body["remaining"], available=body["available"],
                   usage_percentage=float(body["usagePercentage"]), status=body["status"], cap=body["cap"],
                   overage=Overage(tokens=overage.get("tokens", 0), charge=_decimal(overage.get("charge", "0"))),
                   period_start=parse_time(body["periodStart"]), period_end=parse_time(body["periodEnd"]))


@dataclass(frozen=True, slots=True)
class Consumption:
    """A consume's answer. `replayed` is true when the operation id had already been recorded
    (HTTP 200 with `Idempotent-Replayed`): the tokens were counted once, by the first request."""

    operation_id: str
    entry_id: int
    tokens: int
    recorded_at: datetime
    usage: Usage
    replayed: bool
    request_id: str | None = None

    @classmethod
    def from_api(cls, body: dict[str, Any], *, replayed: bool, request_id: str | None = None) -> Consumption:
        return cls(operation_id=body["operationId"], entry_id=body["entryId"], tokens=body["tokens"],
                   recorded_at=parse_time(body["recordedAt"]), usage=Usage.from_api(body["usage"]),
                   replayed=replayed, request_id=request_id)


@dataclass(frozen=True, slots=True)
class ConsumeItem:
    """One consume of a batch (consume_batch, BatchRecorder)."""

    user_id: int
    tokens: int
    operation_type: str
    operation_id: str
    provider: str = ""
    model: str = ""
    reservation_id: uuid.UUID | str | None = None
    estimated_tokens: int | None = None
    script_class: str | None = None  # the estimate's (Estimate.script_class)

    def to_api(self) -> dict[str, Any]:
        body: dict[str, Any] = {"userId": self.user_id, "operationId": self.operation_id, "tokens": self.tokens,
                                "operationType": self.operation_type}
        if self.provider:
            body["provider"] = self.provider
        if self.model:
            body["model"] = self.model
        if self.reservation_id is not None:
            body["reservationId"] = str(self.reservation_id)
        if self.estimated_tokens is not None:
            body["estimatedTokens"] = self.estimated_tokens
        if self.script_class:
            body["scriptClass"] = self.script_class
        return body


@dataclass(frozen=True, slots=True)
class BatchItemResult:
    index: int
    operation_id: str
    user_id: int
    entry_id: int
    replayed: bool
    usage: Usage

    @classmethod
    def from_api(cls, body: dict[str, Any]) -> BatchItemResult:
        return cls(index=body["index"], operation_id=body["operationId"], user_id=body["userId"],
                   entry_id=body["entryId"], replayed=body["result"] == "replayed", usage=Usage.from_api(body["usage"]))


@dataclass(frozen=True, slots=True)
class BatchResult:
    recorded: int
    replayed: int
    items: list[BatchItemResult]
    request_id: str | None = None

    @classmethod
    def from_api(cls, body: dict[str, Any], *, request_id: str | None = None) -> BatchResult:
        return cls(recorded=body["recorded"], replayed=body["replayed"],
                   items=[BatchItemResult.from_api(item) for item in body["results"]], request_id=request_id)


@dataclass(frozen=True, slots=True)
class Release:
    reservation_id: uuid.UUID
    status: str  # "released" (a release of a released hold answers the same)
    tokens: int

    @classmethod
    def from_api(cls, body: dict[str, Any]) -> Release:
        return cls(reservation_id=uuid.UUID(body["reservationId"]), status=body["status"], tokens=body["tokens"])


@dataclass(frozen=True, slots=True)
class HistoryEntry:
    """One ledger row: a consumption, reservation, release, grant, adjustment or reset."""

    id: int
    kind: str
    tokens: int
    reserved_delta: int
    operation_id: str
    operation_type: str
    provider: str
    model: str
    estimated_tokens: int | None
    actual_tokens: int | None
    reason: str
    created_at: datetime

    @classmethod
    def from_api(cls, body: dict[str, Any]) -> HistoryEntry:
        return cls(id=body["id"], kind=body["kind"], tokens=body["tokens"], reserved_delta=body["reservedDelta"],
                   operation_id=body["operationId"], operation_type=body["operationType"], provider=body["provider"],
                   model=body["model"], estimated_tokens=body.get("estimatedTokens"),
                   actual_tokens=body.get("actualTokens"), reason=body.get("reason", ""),
                   created_at=parse_time(body["createdAt"]))


@dataclass(frozen=True, slots=True)
class DailyUsage:
    date: date
    total_tokens: int
    request_count: int
    operation_type: str | None = None  # with group_by="operationType"

    @classmethod
    def from_api(cls, body: dict[str, Any]) -> DailyUsage:
        return cls(date=date.fromisoformat(body["date"]), total_tokens=body["totalTokens"],
                   request_count=body["requestCount"], operation_type=body.get("operationType"))


@dataclass(frozen=True, slots=True)
class OperationTotal:
    operation_type: str
    tokens: int
    requests: int


@dataclass(frozen=True, slots=True)
class MonthlyReport:
    month: str  # YYYY-MM
    total_tokens: int
    total_requests: int
    avg_tokens_per_request: Decimal
    operations: list[OperationTotal]

    @classmethod
    def from_api(cls, body: dict[str, Any]) -> MonthlyReport:
        return cls(month=body["month"], total_tokens=body["totalTokens"], total_requests=body["totalRequests"],
                   avg_tokens_per_request=_decimal(body["avgTokensPerRequest"]),
                   operations=[OperationTotal(operation_type=o["operationType"], tokens=o["tokens"],
                                              requests=o["requests"]) for o in body["operations"]])
