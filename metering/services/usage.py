"""Reading usage, checking, reserving and releasing tokens. Consuming them is the
consume package (consume/); its contract builds the usage dict every answer carries.

Every change to a period's counters is one conditional UPDATE (the cap is in its
WHERE clause, so concurrent requests can never pass it together) plus the ledger
row that explains it, in one transaction.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from django.conf import settings
from django.db import IntegrityError, connection, transaction
from django.db.models import F, Q
from django.utils import timezone

from ..errors import ReservationExpired, ReservationNotFound, UnknownOperationType, UnknownProvider
from ..models import Account, LedgerEntry, OperationType, Provider, Reservation, UsagePeriod
from .accounts import account_for_user, period_current
from .audit import audit_record
from .consume.contract import PeriodFigures, usage_percentage, usage_status
from .context import RequestContext
from .prepared import fetch_one_prepared


@dataclass(frozen=True)
class Usage:
    """A period's figures as the API, the dashboard and e-mails show them; as_api is the
    consume contract's usage dict, the one every answer carries."""

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
        figures = PeriodFigures(tier=self.tier, limit=self.limit, reserved=self.reserved, cap=self.cap,
                                overage_rate=self.overage_rate, period_start=self.period_start,
                                period_end=self.period_end)
        return figures.as_api(self.used)


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


def within_cap(tokens: int) -> Q:
    """The cap as an UPDATE's condition, so concurrent requests can never pass it together:
    used + reserved + tokens <= cap (the PostgreSQL consume statements say it alike)."""
    return Q(used__lte=F("cap") - F("reserved") - tokens)


def period_available(period: UsagePeriod) -> int:
    """What may still be used or reserved in the period."""
    return max(0, period.cap - period.used - period.reserved)


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
        available = period_available(period)
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
            return CheckResult(True, period_available(period), 0, period.cap, held)
    try:
        with transaction.atomic():
            placed = UsagePeriod.objects.filter(within_cap(tokens), pk=period.pk).update(
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
        return CheckResult(True, period_available(period), 0, period.cap, held)
    period.refresh_from_db()
    available = period_available(period)
    if not placed:
        audit_record(ctx=ctx, user_id=account.user_id, action="reserve", result="insufficient", tokens=tokens,
                     operation_type=operation_type, operation_id=operation_id)
        return CheckResult(False, available, _overage_of(period, tokens), period.cap)
    return CheckResult(True, available, max(0, period.used + period.reserved - max(period.token_limit, period.used + period.reserved - tokens)),
                       period.cap, reservation)


def reservation_of(account: Account, reservation_id: str, *, lock: bool) -> Reservation:
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
        reservation = reservation_of(account, reservation_id, lock=True)
        if reservation.status == status:
            return reservation
        if reservation.status != Reservation.Status.HELD:
            raise ReservationExpired(f"Reservation {reservation_id} is {reservation.status}.",
                                     extra={"status": reservation.status})
        reservation_hold_release(reservation, ctx=ctx, status=status)
        audit_record(ctx=ctx, user_id=user_id, action="release", result=status, tokens=reservation.tokens,
                     operation_type=reservation.operation_type, operation_id=reservation.operation_id,
                     detail={"reservationId": str(reservation.pk)})
    return reservation


def reservation_hold_release(reservation: Reservation, *, ctx: RequestContext, status: str) -> None:
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
            reservation_hold_release(reservation, ctx=RequestContext(actor="cleanup"), status=Reservation.Status.EXPIRED)
            audit_record(ctx=RequestContext(actor="cleanup"), user_id=reservation.account.user_id, action="release",
                         result="expired", tokens=reservation.tokens, operation_id=reservation.operation_id,
                         detail={"reservationId": str(reservation.pk)})
            expired += 1
    return expired
