"""Checking, reserving, consuming and releasing tokens.

Every change to a period's counters is one conditional UPDATE (the cap is in its
WHERE clause, so concurrent requests can never pass it together) plus the ledger
row that explains it, in one transaction.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from json.encoder import encode_basestring_ascii as _json_string  # json.dumps' own string encoder (C)
from datetime import datetime, timedelta
from datetime import timezone as dt_timezone
from decimal import Decimal
from typing import Any

from django.conf import settings
from django.db import IntegrityError, connection, transaction
from django.db.models.base import ModelState
from django.db.models import F
from django.utils import timezone

from consensus_tokens.errors import ApplicationError
from ..errors import (
    OperationIdConflict,
    ReservationExpired,
    ReservationNotFound,
    TokenCapExceeded,
    UnknownOperationType,
    UnknownProvider,
)

from ..models import Account, LedgerEntry, OperationType, Provider, Reservation, UsagePeriod
from ..signals import usage_recorded, usage_recorded_many
from .accounts import account_for_user, period_current
from .audit import audit_record, known_user_id
from .context import RequestContext
from .prepared import fetch_one_prepared


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


@dataclass(frozen=True)
class Usage:
    """A period's figures as the API, the dashboard and e-mails show them."""

    tier: str | None
    limit: int
    used: int
    reserved: int
    cap: int
    overage_rate: Decimal
    period_start: datetime
    period_end: datetime

    @property
    def remaining(self) -> int:
        return max(0, self.limit - self.used)

    @property
    def available(self) -> int:
        return max(0, self.cap - self.used - self.reserved)

    @property
    def percentage(self) -> float:
        return usage_percentage(used=self.used, limit=self.limit, cap=self.cap)

    @property
    def status(self) -> str:
        return usage_status(self.percentage)

    @property
    def overage_tokens(self) -> int:
        return max(0, self.used - self.limit)

    @property
    def overage_charge(self) -> Decimal:
        return Decimal(self.overage_tokens) * Decimal(self.overage_rate)

    def as_api(self) -> dict[str, Any]:
        return {
            "tier": self.tier,
            "limit": self.limit,
            "used": self.used,
            "reserved": self.reserved,
            "remaining": self.remaining,
            "available": self.available,
            "usagePercentage": self.percentage,
            "status": self.status,
            "cap": self.cap,
            "overage": {"tokens": self.overage_tokens, "charge": format_usd(self.overage_charge)},
            "periodStart": self.period_start.isoformat().replace("+00:00", "Z"),
            "periodEnd": self.period_end.isoformat().replace("+00:00", "Z"),
        }


def format_usd(amount: Decimal) -> str:
    """Full precision, no exponent, no trailing zeros beyond cents-free form: "1.234", "0"."""
    text = format(amount.normalize(), "f")
    return text


def usage_of(period: UsagePeriod, tier_slug: str | None) -> Usage:
    return Usage(tier=tier_slug, limit=period.token_limit, used=period.used, reserved=period.reserved, cap=period.cap,
                 overage_rate=Decimal(period.overage_rate), period_start=period.starts_at, period_end=period.ends_at)


_USAGE = """
SELECT t.slug, p.token_limit, p.used, p.reserved, p.cap, p.overage_rate, p.starts_at, p.ends_at
FROM metering_account a
LEFT JOIN metering_tier t ON t.id = a.tier_id
JOIN LATERAL (SELECT * FROM metering_usageperiod cur
              WHERE cur.account_id = a.id AND cur.starts_at <= %(now)s AND cur.ends_at > %(now)s
              ORDER BY cur.starts_at DESC LIMIT 1) p ON true
WHERE a.user_id = %(user_id)s
"""


def usage_get(*, user_id: int) -> Usage:
    if settings.METERING_FAST_PATH and connection.vendor == "postgresql":
        # One prepared read when the account and its current period exist (nearly
        # always); otherwise the path below creates them, or says the user is unknown.
        row = fetch_one_prepared(_USAGE, {"user_id": user_id, "now": timezone.now()})
        if row is not None:
            tier, limit, used, reserved, cap, rate, starts_at, ends_at = row
            return Usage(tier=tier, limit=limit, used=used, reserved=reserved, cap=cap,
                         overage_rate=Decimal(rate), period_start=starts_at, period_end=ends_at)
    account = account_for_user(user_id=user_id)
    period = period_current(account=account)
    return usage_of(period, account.tier.slug if account.tier else None)


def operation_type_get(slug: str) -> OperationType:
    op = OperationType.objects.filter(slug=slug, active=True).first()
    if op is None:
        raise UnknownOperationType(f"Unknown operation type '{slug}'.")
    return op


def provider_check(slug: str) -> None:
    if slug and not Provider.objects.filter(slug=slug, active=True).exists():
        raise UnknownProvider(f"Unknown provider '{slug}'.")


_PERIOD_FIELDS = {"id", "account_id", "starts_at", "ends_at", "token_limit", "cap", "overage_rate", "used",
                  "reserved", "closed_at", "updated_at"}
# period_after_update fills every column; a field added to UsagePeriod must be added there too.
assert {f.attname for f in UsagePeriod._meta.concrete_fields} == _PERIOD_FIELDS, "update period_after_update"


def period_after_update(row: tuple, now: datetime, alias: str | None = None) -> UsagePeriod:
    """The period as a raw UPDATE ... RETURNING left it (id, account_id, used, reserved,
    token_limit, cap, overage_rate, starts_at, ends_at), for usage_recorded's receivers:
    built as Model.from_db would, without __init__'s per-field work (1,000 periods a batch;
    pass `alias`, connection.alias, once for them all: each lookup goes through a local)."""
    pk, account_id, used, reserved, limit, cap, rate, starts_at, ends_at = row
    period = UsagePeriod.__new__(UsagePeriod)
    state = period._state = ModelState()
    state.adding, state.db = False, alias or connection.alias
    period.__dict__.update(id=pk, account_id=account_id, starts_at=starts_at, ends_at=ends_at, token_limit=limit,
                           cap=cap, overage_rate=rate, used=used, reserved=reserved, closed_at=None,
                           updated_at=now)
    return period


def _notify_usage(period: UsagePeriod, used_before: int) -> None:
    usage_recorded.send(sender=UsagePeriod, period=period, used_before=used_before)


def _notify_usages(changes: list[tuple[UsagePeriod, int]]) -> None:
    """Many periods at once (a batch): one send, not one per period."""
    if changes:
        usage_recorded_many.send(sender=UsagePeriod, changes=changes)


# --- check and reserve ---------------------------------------------------------------------------

@dataclass(frozen=True)
class CheckResult:
    sufficient: bool
    available: int
    overage: int
    cap: int
    reservation: Reservation | None = None


def _overage_of(period: UsagePeriod, tokens: int) -> int:
    """How many of `tokens` would land past the limit."""
    committed = period.used + period.reserved
    return max(0, committed + tokens - max(period.token_limit, committed))


def usage_check(*, user_id: int, tokens: int, ctx: RequestContext, operation_type: str = "",
                reserve: bool = False, operation_id: str = "", ttl_seconds: int | None = None) -> CheckResult:
    if operation_type:
        operation_type_get(operation_type)
    account = account_for_user(user_id=user_id)
    period = period_current(account=account)
    if not reserve:
        available = max(0, period.cap - period.used - period.reserved)
        sufficient = tokens <= available
        audit_record(ctx=ctx, user_id=user_id, action="check", result="sufficient" if sufficient else "insufficient",
                     tokens=tokens, operation_type=operation_type, operation_id=operation_id)
        return CheckResult(sufficient, available, _overage_of(period, tokens), period.cap)
    return _reserve(account=account, period=period, tokens=tokens, ctx=ctx, operation_type=operation_type,
                    operation_id=operation_id, ttl_seconds=ttl_seconds)


def _reserve(*, account: Account, period: UsagePeriod, tokens: int, ctx: RequestContext, operation_type: str,
             operation_id: str, ttl_seconds: int | None) -> CheckResult:
    now = timezone.now()
    if operation_id:
        held = Reservation.objects.filter(account=account, operation_id=operation_id,
                                          status=Reservation.Status.HELD).first()
        if held is not None:  # a retried reserve: answer with the hold already placed
            period.refresh_from_db()
            return CheckResult(True, max(0, period.cap - period.used - period.reserved), 0, period.cap, held)
    try:
        with transaction.atomic():
            placed = UsagePeriod.objects.filter(pk=period.pk, used__lte=F("cap") - F("reserved") - tokens).update(
                reserved=F("reserved") + tokens)
            if placed:
                reservation = Reservation.objects.create(
                    account=account, period=period, tokens=tokens, operation_id=operation_id,
                    operation_type=operation_type, created_at=now,
                    expires_at=now + timedelta(seconds=ttl_seconds or settings.RESERVATION_TTL_SECONDS))
                LedgerEntry.objects.create(account=account, period=period, kind=LedgerEntry.Kind.RESERVATION,
                                           reserved_delta=tokens, operation_id=operation_id,
                                           operation_type=operation_type, reservation=reservation,
                                           service_key_id=ctx.service_key_id, created_at=now)
                audit_record(ctx=ctx, user_id=account.user_id, action="reserve", result="reserved", tokens=tokens,
                             operation_type=operation_type, operation_id=operation_id,
                             detail={"reservationId": str(reservation.pk)})
    except IntegrityError:
        # the same operation id reserved concurrently: answer with that hold
        held = Reservation.objects.get(account=account, operation_id=operation_id, status=Reservation.Status.HELD)
        period.refresh_from_db()
        return CheckResult(True, max(0, period.cap - period.used - period.reserved), 0, period.cap, held)
    period.refresh_from_db()
    available = max(0, period.cap - period.used - period.reserved)
    if not placed:
        audit_record(ctx=ctx, user_id=account.user_id, action="reserve", result="insufficient", tokens=tokens,
                     operation_type=operation_type, operation_id=operation_id)
        return CheckResult(False, available, _overage_of(period, tokens), period.cap)
    return CheckResult(True, available, max(0, period.used + period.reserved - max(period.token_limit, period.used + period.reserved - tokens)),
                       period.cap, reservation)


def _reservation_for(account: Account, reservation_id: str, *, lock: bool) -> Reservation:
    qs = Reservation.objects.filter(pk=reservation_id, account=account)
    if lock:
        qs = qs.select_for_update()
    reservation = qs.first()
    if reservation is None:
        raise ReservationNotFound(f"No reservation {reservation_id} for this user.")
    return reservation


def reservation_release(*, user_id: int, reservation_id: str, ctx: RequestContext,
                        status: str = Reservation.Status.RELEASED) -> Reservation:
    """Release a hold. Releasing one already released answers the same; one that was
    settled or expired cannot be released."""
    account = account_for_user(user_id=user_id)
    with transaction.atomic():
        reservation = _reservation_for(account, reservation_id, lock=True)
        if reservation.status == status:
            return reservation
        if reservation.status != Reservation.Status.HELD:
            raise ReservationExpired(f"Reservation {reservation_id} is {reservation.status}.",
                                     extra={"status": reservation.status})
        _release_hold(reservation, ctx=ctx, status=status)
        audit_record(ctx=ctx, user_id=user_id, action="release", result=status, tokens=reservation.tokens,
                     operation_type=reservation.operation_type, operation_id=reservation.operation_id,
                     detail={"reservationId": str(reservation.pk)})
    return reservation


def _release_hold(reservation: Reservation, *, ctx: RequestContext, status: str) -> None:
    now = timezone.now()
    UsagePeriod.objects.filter(pk=reservation.period_id).update(reserved=F("reserved") - reservation.tokens)
    LedgerEntry.objects.create(account_id=reservation.account_id, period_id=reservation.period_id,
                               kind=LedgerEntry.Kind.RELEASE, reserved_delta=-reservation.tokens,
                               operation_id=reservation.operation_id, operation_type=reservation.operation_type,
                               reservation=reservation, service_key_id=ctx.service_key_id, actor=ctx.actor,
                               reason=status, created_at=now)
    reservation.status = status
    reservation.finished_at = now
    reservation.save(update_fields=["status", "finished_at"])


def reservations_expire_stale(*, now: datetime | None = None, limit: int = 1000) -> int:
    """Release holds past their expiry (cleanup job). Safe to run concurrently:
    each hold is locked, rows another run holds are skipped."""
    now = now or timezone.now()
    expired = 0
    with transaction.atomic():
        stale = list(Reservation.objects.select_for_update(skip_locked=True)
                     .filter(status=Reservation.Status.HELD, expires_at__lte=now)[:limit])
        for reservation in stale:
            _release_hold(reservation, ctx=RequestContext(actor="cleanup"), status=Reservation.Status.EXPIRED)
            audit_record(ctx=RequestContext(actor="cleanup"), user_id=reservation.account.user_id, action="release",
                         result="expired", tokens=reservation.tokens, operation_id=reservation.operation_id,
                         detail={"reservationId": str(reservation.pk)})
            expired += 1
    return expired


# --- consume -------------------------------------------------------------------------------------

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


def consume_response(*, request: ConsumeRequest, usage: Usage, recorded_at: datetime) -> dict[str, Any]:
    """The answer to a consume, stored on its ledger row so a replay answers the same."""
    return {
        "operationId": request.operation_id,
        "tokens": request.tokens,
        "recordedAt": recorded_at.isoformat().replace("+00:00", "Z"),
        "usage": usage.as_api(),
    }


def stored_body(response: dict[str, Any], request: ConsumeRequest) -> dict[str, Any]:
    """The answer a consume gave, from its ledger row's `response`: the body itself
    (ORM and batch paths), or, from the single-statement path (fast_consume.py),
    the usage after it, which PostgreSQL stored raw and this formats - so the
    formatting lives in one place, consume_response."""
    after = response.get("usageAfter")
    if after is None:
        return response
    usage = Usage(tier=after["tier"], limit=after["limit"], used=after["used"], reserved=after["reserved"],
                  cap=after["cap"], overage_rate=Decimal(after["overageRate"]),
                  period_start=_stored_time(after["periodStart"]), period_end=_stored_time(after["periodEnd"]))
    return consume_response(request=request, usage=usage, recorded_at=_stored_time(response["recordedAt"]))


def _stored_time(value: str) -> datetime:
    return datetime.fromisoformat(value).astimezone(dt_timezone.utc)


def _replay(account: Account, request: ConsumeRequest, ctx: RequestContext) -> ConsumeResult | None:
    entry = (LedgerEntry.objects.filter(account=account, operation_id=request.operation_id,
                                        kind=LedgerEntry.Kind.CONSUMPTION)
             .only("pk", "fingerprint", "response").first())
    if entry is None:
        return None
    if entry.fingerprint != request.fingerprint():
        audit_record(ctx=ctx, user_id=request.user_id, action="consume", result="operation_id_conflict",
                     tokens=request.tokens, operation_type=request.operation_type, operation_id=request.operation_id)
        raise OperationIdConflict(f"Operation {request.operation_id} was already recorded with a different body.")
    audit_record(ctx=ctx, user_id=request.user_id, action="consume", result="replayed", tokens=request.tokens,
                 operation_type=request.operation_type, operation_id=request.operation_id)
    return ConsumeResult({**stored_body(entry.response, request), "entryId": entry.pk}, replayed=True)


def usage_consume(*, request: ConsumeRequest, ctx: RequestContext) -> ConsumeResult:
    """Record what an operation spent, exactly once per (user, operation id)."""
    if request.tokens <= 0 or request.tokens > settings.MAX_TOKENS_PER_REQUEST:
        raise ApplicationError("tokens out of range", code="invalid_request")
    if (settings.METERING_FAST_PATH and not request.reservation_id and connection.vendor == "postgresql"):
        from .fast_consume import consume_fast

        result = consume_fast(request=request, ctx=ctx)
        if result is not None:
            return result
    return _consume_orm(request=request, ctx=ctx)


def _consume_orm(*, request: ConsumeRequest, ctx: RequestContext) -> ConsumeResult:
    operation_type_get(request.operation_type)
    if request.provider:
        provider_check(request.provider)
    account = account_for_user(user_id=request.user_id)
    replay = _replay(account, request, ctx)
    if replay is not None:
        return replay
    period = period_current(account=account)
    try:
        with transaction.atomic():
            result = _record_consumption(account=account, period=period, request=request, ctx=ctx)
    except (IntegrityError, TokenCapExceeded, ReservationExpired):
        # The same operation id recorded concurrently: everything above rolled back.
        # The refusal may be that very request's doing (it filled the cap, or settled
        # the reservation) - then this is its replay, not a refusal.
        replay = _replay(account, request, ctx)
        if replay is None:
            raise
        return replay
    return result


def _record_consumption(*, account: Account, period: UsagePeriod, request: ConsumeRequest,
                        ctx: RequestContext) -> ConsumeResult:
    now = timezone.now()
    tier_slug = account.tier.slug if account.tier else None
    reserved_delta = 0
    reservation = None
    if request.reservation_id:
        reservation = _reservation_for(account, request.reservation_id, lock=True)
        # past its expiry a hold is expired whether or not the cleanup job has run yet,
        # so the answer does not depend on that job's timing
        status = Reservation.Status.EXPIRED if reservation.expires_at <= now else reservation.status
        if status != Reservation.Status.HELD:
            raise ReservationExpired(
                f"Reservation {request.reservation_id} is {status}; consume without reservationId.",
                extra={"status": status})
        if reservation.period_id == period.pk:
            reserved_delta = -reservation.tokens
        else:  # held in a period that has ended: free it there, charge this one
            _release_hold(reservation, ctx=ctx, status=Reservation.Status.SETTLED)
        # the operation already ran: record the actual tokens whatever the cap says
        changed = UsagePeriod.objects.filter(pk=period.pk).update(
            used=F("used") + request.tokens, reserved=F("reserved") + reserved_delta)
    else:
        changed = UsagePeriod.objects.filter(
            pk=period.pk, used__lte=F("cap") - F("reserved") - request.tokens).update(used=F("used") + request.tokens)
    if not changed:
        raise TokenCapExceeded("This operation would pass the user's token cap.",
                               extra={"available": max(0, period.cap - period.used - period.reserved),
                                      "cap": period.cap})
    period.refresh_from_db(fields=["used", "reserved", "token_limit", "cap", "overage_rate"])
    body = consume_response(request=request, usage=usage_of(period, tier_slug), recorded_at=now)
    entry = LedgerEntry(account=account, period=period, kind=LedgerEntry.Kind.CONSUMPTION,
                        used_delta=request.tokens, reserved_delta=reserved_delta, operation_id=request.operation_id,
                        operation_type=request.operation_type, provider=request.provider, model=request.model,
                        estimated_tokens=request.estimated_tokens, actual_tokens=request.tokens,
                        reservation=reservation, service_key_id=ctx.service_key_id,
                        fingerprint=request.fingerprint(), response=body, created_at=now)
    entry.save()
    if reservation is not None and reservation.status == Reservation.Status.HELD:
        reservation.status = Reservation.Status.SETTLED
        reservation.finished_at = now
        reservation.save(update_fields=["status", "finished_at"])
    audit_record(ctx=ctx, user_id=request.user_id, action="consume", result="recorded", tokens=request.tokens,
                 operation_type=request.operation_type, operation_id=request.operation_id)
    _notify_usage(period, period.used - request.tokens)
    return ConsumeResult({**body, "entryId": entry.pk}, replayed=False)


def consume_refused(*, request: ConsumeRequest, ctx: RequestContext, error: ApplicationError) -> None:
    """Audit a refused consume (outside the rolled-back transaction)."""
    user_id = known_user_id(request.user_id)
    audit_record(ctx=ctx, user_id=user_id, action="consume", result=error.code, tokens=request.tokens,
                 operation_type=request.operation_type, operation_id=request.operation_id,
                 detail={} if user_id else {"userId": request.user_id})

