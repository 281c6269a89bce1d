"""The consume contract: what a consume asks (ConsumeRequest, the limits), what it
answers (ConsumeResult, BatchItemResult, BatchRefused) and the answer's body, built
here once for every path - ORM and PostgreSQL, single and batch - and for replays.

No database access: the paths (orm.py, postgres.py) import this, never each other.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime
from datetime import timezone as dt_timezone
from decimal import Decimal
from json.encoder import encode_basestring_ascii as _json_string  # json.dumps' own string encoder (C)
from typing import Any, Iterable

from django.conf import settings

from consensus_tokens.errors import ApplicationError

MAX_BATCH = 1000


def tokens_check(tokens: int) -> None:
    """A consume records 1 to MAX_TOKENS_PER_REQUEST tokens."""
    if tokens <= 0 or tokens > settings.MAX_TOKENS_PER_REQUEST:
        raise ApplicationError("tokens out of range", code="invalid_request")


class BatchRefused(ApplicationError):
    """Carries the offending item's index so the caller knows what to fix."""

    def __init__(self, message: str, *, code: str, status: int, index: int,
                 extra: dict[str, Any] | None = None) -> None:
        super().__init__(message, code=code, status=status, extra={"index": index, **(extra or {})})


@dataclass(frozen=True)
class ConsumeRequest:
    user_id: int
    operation_id: str
    tokens: int
    operation_type: str
    provider: str = ""
    model: str = ""
    reservation_id: str = ""
    estimated_tokens: int | None = None
    # The estimate's scriptClass, for calibration. A hint about the estimate, not about what
    # was consumed: not in the fingerprint, so a replay that says another class is a replay.
    script_class: str = ""

    def fingerprint(self) -> str:
        """sha256 of the JSON array [tokens, operationType, provider, model, reservationId,
        estimatedTokens], compact. Stored with every consumption: it must never change."""
        tokens, estimated = self.tokens, self.estimated_tokens
        if type(tokens) is int and (estimated is None or type(estimated) is int):
            # What json.dumps writes for these types, without its per-call encoder set-up
            # (a 1,000-item batch computes 1,000 of these): the same bytes, faster (bench/README.md).
            text = (f"[{tokens},{_json_string(self.operation_type)},{_json_string(self.provider)},"
                    f"{_json_string(self.model)},{_json_string(self.reservation_id)},"
                    f"{'null' if estimated is None else estimated}]")
        else:
            text = json.dumps([tokens, self.operation_type, self.provider, self.model, self.reservation_id, estimated],
                              separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class ConsumeResult:
    body: dict[str, Any]
    replayed: bool


@dataclass(frozen=True)
class BatchItemResult:
    index: int
    body: dict[str, Any]
    replayed: bool


# --- the answer body -----------------------------------------------------------------------------

def usage_status(percentage: float) -> str:
    if percentage < 50:
        return "low"
    if percentage < 75:
        return "moderate"
    if percentage < 90:
        return "warning"
    if percentage < 100:
        return "critical"
    return "exceeded"


def usage_percentage(*, used: int, limit: int, cap: int) -> float:
    """Used / limit in %, rounded down to 0.01: never shows a threshold (and so a status) as
    reached before it is, e.g. 49,999 of 50,000 is 99.99, not 100. Without a limit: 100 when
    nothing may or some was used, else 0."""
    if limit <= 0:
        return 100.0 if cap <= 0 or used > 0 else 0.0
    return (max(0, used) * 10_000 // limit) / 100


def format_usd(amount: Decimal) -> str:
    """Full precision, no exponent, no trailing zeros beyond cents-free form: "1.234", "0"."""
    return format(amount.normalize(), "f")


def api_time(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


class PeriodFigures:
    """A period's figures, all but `used`; as_api(used) is the usage dict every answer
    carries (consume, batch, replay, GET usage through Usage.as_api). What does not depend
    on `used` is worked out once: a 1,000-item batch builds 1,000 of these dicts from one
    PeriodFigures per period. `shared` lets periods share the formatting of their bounds
    and rate (they mostly have the same)."""

    __slots__ = ("cap", "end", "limit", "no_charge", "rate", "reserved", "start", "tier")

    def __init__(self, *, tier: str | None, limit: int, reserved: int, cap: int, overage_rate: Any,
                 period_start: datetime, period_end: datetime, shared: dict[Any, str] | None = None) -> None:
        self.tier, self.limit, self.reserved, self.cap = tier, limit, reserved, cap
        self.rate = rate = Decimal(overage_rate)
        if shared is None:
            self.start, self.end = api_time(period_start), api_time(period_end)
            self.no_charge = format_usd(Decimal(0) * rate)
            return
        if (start := shared.get(period_start)) is None:
            start = shared[period_start] = api_time(period_start)
        if (end := shared.get(period_end)) is None:
            end = shared[period_end] = api_time(period_end)
        if (no_charge := shared.get(rate)) is None:
            no_charge = shared[rate] = format_usd(Decimal(0) * rate)
        self.start, self.end, self.no_charge = start, end, no_charge

    def as_api(self, used: int) -> dict[str, Any]:
        limit, cap, reserved = self.limit, self.cap, self.reserved
        percentage = usage_percentage(used=used, limit=limit, cap=cap)
        over = used - limit if used > limit else 0
        return {
            "tier": self.tier,
            "limit": limit,
            "used": used,
            "reserved": reserved,
            "remaining": limit - used if limit > used else 0,
            "available": cap - used - reserved if cap > used + reserved else 0,
            "usagePercentage": percentage,
            "status": usage_status(percentage),
            "cap": cap,
            "overage": {"tokens": over, "charge": format_usd(Decimal(over) * self.rate) if over else self.no_charge},
            "periodStart": self.start,
            "periodEnd": self.end,
        }


def consume_body(*, request: ConsumeRequest, usage: dict[str, Any], recorded_at: str) -> dict[str, Any]:
    """The answer to a consume (without its entryId), as the ORM paths store it on the
    ledger row so a replay answers the same."""
    return {"operationId": request.operation_id, "tokens": request.tokens, "recordedAt": recorded_at,
            "usage": usage}


def running_bodies(items: Iterable[tuple[ConsumeRequest, Any]], figures: dict[Any, PeriodFigures],
                   used_before: dict[Any, int], recorded_at: str) -> list[dict[str, Any]]:
    """A batch's bodies, in item order: each item's usage right after it (its period's
    `used` before the batch plus this and the earlier items for that period), as the
    batch's ledger rows store it. `items` pairs each request with its period's key."""
    running = dict(used_before)
    bodies = []
    for request, key in items:
        used = running[key] = running[key] + request.tokens
        bodies.append(consume_body(request=request, usage=figures[key].as_api(used), recorded_at=recorded_at))
    return bodies


def stored_body(response: dict[str, Any], request: ConsumeRequest) -> dict[str, Any]:
    """The answer a consume gave, from its ledger row's `response`: the body itself (ORM
    paths), or, from the PostgreSQL statements (consume_single.sql, batch_write.sql), the
    usage right after it, which PostgreSQL stored raw ("usageAfter") and this formats."""
    after = response.get("usageAfter")
    if after is None:
        return response
    figures = PeriodFigures(tier=after["tier"], limit=after["limit"], reserved=after["reserved"], cap=after["cap"],
                            overage_rate=after["overageRate"], period_start=_stored_time(after["periodStart"]),
                            period_end=_stored_time(after["periodEnd"]))
    return consume_body(request=request, usage=figures.as_api(after["used"]),
                        recorded_at=api_time(_stored_time(response["recordedAt"])))


def replay_body(*, response: dict[str, Any], request: ConsumeRequest, entry_id: int) -> dict[str, Any]:
    """A replay's answer: the stored one, with its ledger row's id, as the first answer had it."""
    return {**stored_body(response, request), "entryId": entry_id}


def _stored_time(value: str) -> datetime:
    return datetime.fromisoformat(value).astimezone(dt_timezone.utc)
