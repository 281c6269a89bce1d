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
from django.db.models import F, Q, QuerySet, Sum
from django.utils import timezone

from ..errors import ReservationExpired, ReservationNotFound, ReservationSettled, UnknownOperationType, UnknownProvider
from ..models import Account, AuditLog, LedgerEntry, OperationType, Provider, Reservation, UsagePeriod
from .accounts import account_for_user, period_current
from .audit import audit_record, audit_row
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


def usage_of(period: UsagePeriod, tier_slug: str | None, *, reserved: int | None = None) -> Usage:
    """The period's figures; `reserved` overrides its counter (reserved_live: live holds only)."""
    return Usage(tier=tier_slug, limit=period.token_limit, used=period.used,
                 reserved=period.reserved if reserved is None else reserved, cap=period.cap,
                 overage_rate=Decimal(period.overage_rate), period_start=period.starts_at, period_end=period.ends_at)


# `reserved` counts live holds only: a hold past its expiry frees its tokens at once, before
# a write path or the expiry job releases it (the subquery, on the reservation_period_held
# index, runs only for a period that holds something).
_USAGE = """
SELECT t.slug, p.token_limit, p.used,
       p.reserved - CASE WHEN p.reserved > 0 THEN
           (SELECT coalesce(sum(r.tokens), 0) FROM metering_reservation r
            WHERE r.period_id = p.id AND r.status = 'held' AND r.expires_at <= %(now)s) ELSE 0 END,
       p.cap, p.overage_rate, p.starts_at, p.ends_at
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
    return usage_of(period, account.tier.slug if account.tier else None, reserved=reserved_live(period))


def operation_type_get(slug: str) -> OperationType:
    op = OperationType.objects.filter(slug=slug, active=True).first()
    if op is None:
        raise UnknownOperationType(f"Unknown operation type '{slug}'.")
    return op


def provider_check(slug: str) -> None:
    if slug and not Provider.objects.filter(slug=slug, active=True).exists():
        raise UnknownProvider(f"Unknown provider '{slug}'.")


def within_cap(tokens: int, *, freed: int = 0) -> Q:
    """The cap as an UPDATE's condition, so concurrent requests can never pass it together:
    used + reserved - freed + tokens <= cap (the PostgreSQL consume statements say it alike).
    `freed`: the hold a settlement gives back in the same UPDATE, so settling may use more than
    its hold only within the room left under the cap."""
    return Q(used__lte=F("cap") - F("reserved") + freed - tokens)


def period_available(period: UsagePeriod, *, reserved: int | None = None) -> int:
    """What may still be used or reserved in the period (`reserved`: see usage_of)."""
    return max(0, period.cap - period.used - (period.reserved if reserved is None else reserved))


def reserved_live(period: UsagePeriod, *, now: datetime | None = None) -> int:
    """The period's reserved tokens less the holds already past their expiry but not yet
    released (a write path or the expiry job releases them): what reads report, so a hold
    frees its tokens the moment it expires."""
    if period.reserved <= 0:
        return period.reserved
    stale = (Reservation.objects.filter(period=period, status=Reservation.Status.HELD,
                                        expires_at__lte=now or timezone.now())
             .aggregate(tokens=Sum("tokens"))["tokens"])
    return period.reserved - (stale or 0)


# --- check and reserve ---------------------------------------------------------------------------

@dataclass(frozen=True)
class CheckResult:
    sufficient: bool
    available: int
    overage: int
    cap: int
    reservation: Reservation | None = None


def _overage_of(period: UsagePeriod, tokens: int, *, reserved: int | None = None) -> int:
    """How many of `tokens` would land past the limit (`reserved`: see usage_of)."""
    committed = period.used + (period.reserved if reserved is None else reserved)
    return max(0, committed + tokens - max(period.token_limit, committed))


def usage_check(*, user_id: int, tokens: int, ctx: RequestContext, operation_type: str = "",
                reserve: bool = False, operation_id: str = "", ttl_seconds: int | None = None) -> CheckResult:
    if operation_type:
        operation_type_get(operation_type)
    account = account_for_user(user_id=user_id)
    period = period_current(account=account)
    if not reserve:
        reserved = reserved_live(period)
        available = period_available(period, reserved=reserved)
        sufficient = tokens <= available
        audit_record(ctx=ctx, user_id=user_id, action="check", result="sufficient" if sufficient else "insufficient",
                     tokens=tokens, operation_type=operation_type, operation_id=operation_id)
        return CheckResult(sufficient, available, _overage_of(period, tokens, reserved=reserved), period.cap)
    return _reserve(account=account, period=period, tokens=tokens, ctx=ctx, operation_type=operation_type,
                    operation_id=operation_id, ttl_seconds=ttl_seconds)


def _reserve(*, account: Account, period: UsagePeriod, tokens: int, ctx: RequestContext, operation_type: str,
             operation_id: str, ttl_seconds: int | None) -> CheckResult:
    now = timezone.now()
    if operation_id:
        held = Reservation.objects.filter(account=account, operation_id=operation_id, status=Reservation.Status.HELD,
                                          expires_at__gt=now).first()
        if held is not None:  # a retried reserve: answer with the hold already placed
            period.refresh_from_db()
            return CheckResult(True, period_available(period, reserved=reserved_live(period, now=now)), 0,
                               period.cap, held)
    try:
        with transaction.atomic():
            # expired holds give their tokens back first (and one left under this operation
            # id, wherever it is, its place: one live hold per operation)
            stale = Reservation.objects.filter(period=period)
            if operation_id:
                stale = stale | Reservation.objects.filter(account=account, operation_id=operation_id)
            reservations_expire(stale, now=now)
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
        return CheckResult(True, period_available(period, reserved=reserved_live(period, now=now)), 0, period.cap,
                           held)
    period.refresh_from_db()
    reserved = reserved_live(period, now=now)
    available = period_available(period, reserved=reserved)
    if not placed:
        audit_record(ctx=ctx, user_id=account.user_id, action="reserve", result="insufficient", tokens=tokens,
                     operation_type=operation_type, operation_id=operation_id)
        return CheckResult(False, available, _overage_of(period, tokens, reserved=reserved), period.cap)
    committed = period.used + reserved
    return CheckResult(True, available, max(0, committed - max(period.token_limit, committed - tokens)),
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
    """Release a hold. Releasing one already released answers the same (idempotent); one
    that was settled is refused as `reservation_settled`, one that expired as
    `reservation_expired` (its tokens are already free)."""
    account = account_for_user(user_id=user_id)
    with transaction.atomic():
        reservation = reservation_of(account, reservation_id, lock=True)
        if reservation.status == status:
            return reservation
        if reservation.status == Reservation.Status.SETTLED:
            raise ReservationSettled(f"Reservation {reservation_id} is settled: its tokens were consumed.",
                                     extra={"status": reservation.status})
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


# Expiry is the system's doing, whichever request or job writes it.
EXPIRY = RequestContext(actor="cleanup")


def reservations_expire(holds: QuerySet[Reservation], *, now: datetime, limit: int | None = None) -> int:
    """Release the holds among `holds` that are past their expiry: each gets a RELEASE ledger
    row (reason "expired") and an audit row, and its period's `reserved` goes down. Runs in
    the caller's transaction (the write paths call it before applying the cap, so a hold frees
    its tokens when it expires, not when a job comes by).

    Never waits on a hold: one another transaction has locked is skipped (that one is settling,
    releasing or expiring it), so this may follow the caller's own hold locks without a
    deadlock. The periods are then locked in id order, as every path locks them."""
    qs = (holds.filter(status=Reservation.Status.HELD, expires_at__lte=now).select_related("account")
          .select_for_update(skip_locked=True, of=("self",)).order_by("pk"))
    stale = list(qs[:limit] if limit is not None else qs)
    if not stale:
        return 0
    list(UsagePeriod.objects.select_for_update().filter(pk__in={r.period_id for r in stale}).order_by("pk")
         .values_list("pk", flat=True))
    for reservation in stale:
        reservation_hold_release(reservation, ctx=EXPIRY, status=Reservation.Status.EXPIRED)
    AuditLog.objects.bulk_create([
        audit_row(ctx=EXPIRY, user_id=r.account.user_id, action="release", result="expired", tokens=r.tokens,
                  operation_id=r.operation_id, detail={"reservationId": str(r.pk)}) for r in stale])
    return len(stale)


def reservations_expire_stale(*, now: datetime | None = None, limit: int = 1000) -> int:
    """Release up to `limit` holds past their expiry, whatever their period (the expiry job).
    Safe to run concurrently: rows another run holds are skipped."""
    with transaction.atomic():
        return reservations_expire(Reservation.objects.all(), now=now or timezone.now(), limit=limit)
