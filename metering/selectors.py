"""Reads: the API, the dashboard and admin go through these."""
from __future__ import annotations

import base64
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta, timezone as dt_timezone
from decimal import ROUND_HALF_UP, Decimal
from typing import Iterator

from django.conf import settings
from django.contrib.auth import get_user_model
from django.db import connection, transaction
from django.db.models import Count, DecimalField, ExpressionWrapper, F, OuterRef, Q, QuerySet, Subquery, Sum, Value
from django.db.models.functions import Coalesce, Greatest, TruncDate
from django.utils import timezone

from .errors import UnknownUser

from .models import Account, Calibration, DailyUsage, LedgerEntry, LedgerRollupState, OperationType, Reservation, Tier, UsagePeriod


def _as_datetime(value: date | datetime, *, end: bool = False) -> datetime:
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=dt_timezone.utc)
    start = datetime.combine(value, time.min, tzinfo=dt_timezone.utc)
    if not end:
        return start
    # the day after 9999-12-31 does not exist: end at the last moment there is
    return start + timedelta(days=1) if value < date.max else datetime.max.replace(tzinfo=dt_timezone.utc)


def ledger_for_user(*, user_id: int, since: date | datetime | None = None, until: date | datetime | None = None,
                    operation_type: str | None = None, kind: str | None = None) -> QuerySet[LedgerEntry]:
    """A user's ledger, newest first. A date `until` includes that whole day."""
    qs = LedgerEntry.objects.filter(account__user_id=user_id)
    if since is not None:
        qs = qs.filter(created_at__gte=_as_datetime(since))
    if until is not None:
        qs = qs.filter(created_at__lt=_as_datetime(until, end=True)) if not isinstance(until, datetime) else qs.filter(created_at__lte=until)
    if operation_type:
        qs = qs.filter(operation_type=operation_type)
    if kind:
        qs = qs.filter(kind=kind)
    return qs.order_by("-created_at", "-id")


# --- usage figures for the dashboard, analytics and the support console --------------------------
#
# Everything below reads DailyUsage (the ledger summed per day) plus a live query for the slice the
# rollup job has not read yet, so the cost depends on the days asked for, never on the length of the
# history. Both reads run in one snapshot, so a rollup committing in between cannot count a row twice.

CONSUMPTION = LedgerEntry.Kind.CONSUMPTION


@contextmanager
def _one_snapshot() -> Iterator[None]:
    """Run the enclosed reads in one snapshot (REPEATABLE READ on PostgreSQL)."""
    if connection.in_atomic_block:  # already inside a transaction (tests): use it as it is
        yield
        return
    with transaction.atomic():
        if connection.vendor == "postgresql":
            with connection.cursor() as cursor:
                cursor.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
        yield


@dataclass(frozen=True)
class UsageGroup:
    """The ledger summed for one period, UTC day, kind, operation type, provider and model."""

    period_id: int
    day: date
    kind: str
    operation_type: str
    provider: str
    model: str
    used_delta: int
    reserved_delta: int
    entries: int


_GROUP = ("period_id", "day", "kind", "operation_type", "provider", "model")


def _live_condition(state: LedgerRollupState | None) -> Q:
    """Ledger rows the rollups have not counted: past the watermark (bounded below
    in time, so the (account, created_at) index serves it) or still pending."""
    if state is None:
        return Q()
    condition = Q(id__gt=state.watermark_id)
    if state.refreshed_at is not None:
        condition &= Q(created_at__gte=state.refreshed_at - timedelta(seconds=settings.ROLLUP_LIVE_SLACK_SECONDS))
    if state.pending_ids:
        condition |= Q(id__in=[int(i) for i in state.pending_ids])
    return condition


def usage_groups(*, account_id: int | None, period_ids: list[int] | None = None, since: date | None = None,
                 until: date | None = None, kind: str | None = None) -> list[UsageGroup]:
    """Rolled-up and live ledger sums for one account (or all, with None), by
    period or by day range (both inclusive). Three queries, whatever the history."""
    rolled = DailyUsage.objects.all()
    live = LedgerEntry.objects.all()
    if account_id is not None:
        rolled, live = rolled.filter(account_id=account_id), live.filter(account_id=account_id)
    if period_ids is not None:
        rolled, live = rolled.filter(period_id__in=period_ids), live.filter(period_id__in=period_ids)
    if since is not None:
        rolled, live = rolled.filter(day__gte=since), live.filter(created_at__gte=_as_datetime(since))
    if until is not None:
        rolled, live = rolled.filter(day__lte=until), live.filter(created_at__lt=_as_datetime(until, end=True))
    if kind is not None:
        rolled, live = rolled.filter(kind=kind), live.filter(kind=kind)
    sums: dict[tuple, list[int]] = defaultdict(lambda: [0, 0, 0])
    with _one_snapshot():
        state = LedgerRollupState.objects.filter(pk=1).first()
        for r in rolled.values_list(*_GROUP, "used_delta", "reserved_delta", "entries"):
            s = sums[r[:6]]
            s[0] += r[6]
            s[1] += r[7]
            s[2] += r[8]
        live = (live.filter(_live_condition(state)).annotate(day=TruncDate("created_at", tzinfo=dt_timezone.utc))
                .order_by().values(*_GROUP).annotate(u=Sum("used_delta"), r=Sum("reserved_delta"), n=Count("id")))
        for r in live:
            s = sums[tuple(r[f] for f in _GROUP)]
            s[0] += r["u"]
            s[1] += r["r"]
            s[2] += r["n"]
    return [UsageGroup(*key, *vals) for key, vals in sums.items()]


@dataclass(frozen=True)
class DayTotal:
    day: date
    tokens: int
    requests: int


@dataclass(frozen=True)
class Breakdown:
    label: str
    tokens: int
    requests: int
    provider: str = ""
    model: str = ""

    @property
    def avg_tokens(self) -> Decimal:
        return (Decimal(self.tokens) / self.requests).quantize(Decimal("0.01"), ROUND_HALF_UP) if self.requests else Decimal(0)


def _daily(groups: list[UsageGroup]) -> list[DayTotal]:
    days: dict[date, list[int]] = defaultdict(lambda: [0, 0])
    for g in groups:
        if g.kind == CONSUMPTION:
            days[g.day][0] += g.used_delta
            days[g.day][1] += g.entries
    return [DayTotal(d, t, n) for d, (t, n) in sorted(days.items())]


def _by(groups: list[UsageGroup], key) -> list[Breakdown]:
    out: dict[tuple, list[int]] = defaultdict(lambda: [0, 0])
    for g in groups:
        if g.kind == CONSUMPTION:
            out[key(g)][0] += g.used_delta
            out[key(g)][1] += g.entries
    return sorted((Breakdown(*k, t, n) if len(k) == 1 else Breakdown(f"{k[0] or '—'} / {k[1] or '—'}", t, n, k[0], k[1])
                   for k, (t, n) in out.items()), key=lambda b: (-b.tokens, b.label))


def account_id_for_user(*, user_id: int) -> int:
    """The user's account id; UnknownUser if there is no such user. A user without
    an account yet has no usage: 0 (no account has that id)."""
    account_id = Account.objects.filter(user_id=user_id).values_list("id", flat=True).first()
    if account_id is not None:
        return account_id
    if not get_user_model().objects.filter(pk=user_id).exists():
        raise UnknownUser(f"No user with id {user_id}.")
    return 0


@dataclass(frozen=True)
class DailyPoint:
    day: date
    tokens: int
    requests: int
    operation_type: str = ""


def usage_daily(*, user_id: int, since: date, until: date, by_operation_type: bool = False) -> list[DailyPoint]:
    """Consumption per UTC day in [since, until] (days with usage only), optionally
    per operation type: the analytics endpoint's figures."""
    groups = usage_groups(account_id=account_id_for_user(user_id=user_id), since=since, until=until, kind=CONSUMPTION)
    out: dict[tuple, list[int]] = defaultdict(lambda: [0, 0])
    for g in groups:
        key = (g.day, g.operation_type) if by_operation_type else (g.day, "")
        out[key][0] += g.used_delta
        out[key][1] += g.entries
    return [DailyPoint(k[0], t, n, k[1]) for k, (t, n) in sorted(out.items())]


@dataclass(frozen=True)
class MonthlyReport:
    month: date
    total_tokens: int
    total_requests: int
    operations: list[Breakdown]

    @property
    def avg_tokens_per_request(self) -> Decimal:
        if not self.total_requests:
            return Decimal("0")
        return (Decimal(self.total_tokens) / self.total_requests).quantize(Decimal("0.01"), ROUND_HALF_UP)


def month_bounds(month: date) -> tuple[date, date]:
    first = month.replace(day=1)
    if first.year == date.max.year and first.month == 12:
        return first, date.max  # there is no month after 9999-12 to count back from
    nxt = first.replace(year=first.year + 1, month=1) if first.month == 12 else first.replace(month=first.month + 1)
    return first, nxt - timedelta(days=1)


def usage_monthly_report(*, user_id: int, month: date) -> MonthlyReport:
    """Consumption in a calendar month (UTC), in total and per operation type."""
    first, last = month_bounds(month)
    groups = usage_groups(account_id=account_id_for_user(user_id=user_id), since=first, until=last, kind=CONSUMPTION)
    operations = _by(groups, lambda g: (g.operation_type,))
    return MonthlyReport(first, sum(o.tokens for o in operations), sum(o.requests for o in operations), operations)


@dataclass(frozen=True)
class PeriodSummary:
    """What the dashboard draws for one period: per day this period and the one
    before it (aligned by day of period), and the breakdowns."""

    daily: list[DayTotal]
    previous_daily: list[DayTotal]
    by_operation: list[Breakdown]
    by_model: list[Breakdown]
    net_used: int  # every kind of entry: proves the figures add up to the period's counter

    @property
    def total_tokens(self) -> int:
        return sum(d.tokens for d in self.daily)

    @property
    def total_requests(self) -> int:
        return sum(d.requests for d in self.daily)


def period_summary(*, period: UsagePeriod, previous: UsagePeriod | None) -> PeriodSummary:
    ids = [period.pk] + ([previous.pk] if previous else [])
    groups = usage_groups(account_id=period.account_id, period_ids=ids)
    this = [g for g in groups if g.period_id == period.pk]
    before = [g for g in groups if previous is not None and g.period_id == previous.pk]
    return PeriodSummary(
        daily=_daily(this), previous_daily=_daily(before),
        by_operation=_by(this, lambda g: (g.operation_type,)),
        by_model=_by(this, lambda g: (g.provider, g.model)),
        net_used=sum(g.used_delta for g in this),
    )


# --- periods, activity, forecast -----------------------------------------------------------------

def operation_types_active() -> list[str]:
    return list(OperationType.objects.filter(active=True).order_by("slug").values_list("slug", flat=True))


def tiers_for_plans() -> list[Tier]:
    """Every tier, smallest first, for the plan card."""
    return list(Tier.objects.order_by("monthly_token_limit", "pk"))


def periods_recent(*, account_id: int, limit: int = 24) -> list[UsagePeriod]:
    """The account's latest periods, newest first (a bounded list for the picker)."""
    return list(UsagePeriod.objects.filter(account_id=account_id).order_by("-starts_at")[:limit])


def period_for_account(*, account_id: int, period_id: int) -> UsagePeriod | None:
    return UsagePeriod.objects.filter(account_id=account_id, pk=period_id).first()


def period_before(*, period: UsagePeriod) -> UsagePeriod | None:
    return (UsagePeriod.objects.filter(account_id=period.account_id, starts_at__lt=period.starts_at)
            .order_by("-starts_at").first())


@dataclass(frozen=True)
class ActivityPage:
    entries: list[LedgerEntry]
    next_cursor: str | None


def _cursor_encode(entry: LedgerEntry) -> str:
    return base64.urlsafe_b64encode(f"{entry.created_at.isoformat()}|{entry.pk}".encode()).decode().rstrip("=")


def _cursor_decode(cursor: str) -> tuple[datetime, int] | None:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        when, pk = raw.split("|")
        moment = datetime.fromisoformat(when)
        if not 0 < int(pk) < 2**63:
            return None
        return (moment if moment.tzinfo else moment.replace(tzinfo=dt_timezone.utc)), int(pk)
    except (ValueError, UnicodeDecodeError):
        return None


def activity_page(*, user_id: int, operation_type: str | None = None, since: date | None = None,
                  until: date | None = None, cursor: str | None = None, size: int = 25) -> ActivityPage:
    """One page of the user's ledger, newest first. Keyset pagination (no COUNT,
    no OFFSET), so a page costs the same on the first day or after ten years."""
    qs = ledger_for_user(user_id=user_id, since=since, until=until, operation_type=operation_type)
    position = _cursor_decode(cursor) if cursor else None
    if position is not None:
        when, pk = position
        qs = qs.filter(Q(created_at__lt=when) | Q(created_at=when, id__lt=pk))
    rows = list(qs.only("id", "created_at", "kind", "used_delta", "reserved_delta", "operation_id", "operation_type",
                        "provider", "model", "estimated_tokens", "actual_tokens", "reason", "actor")[:size + 1])
    more = len(rows) > size
    rows = rows[:size]
    return ActivityPage(rows, _cursor_encode(rows[-1]) if more and rows else None)


@dataclass(frozen=True)
class Forecast:
    """At the pace so far this period: when the limit is reached, and the overage
    charge at the period's end (capped by the period's cap)."""

    pace_per_day: Decimal
    projected_used: int
    limit_reached_at: datetime | None  # None: not at this pace, within the period
    already_reached: bool
    projected_overage_tokens: int
    projected_overage_charge: Decimal
    days_left: int


def usage_forecast(*, used: int, limit: int, cap: int, overage_rate: Decimal, period_start: datetime,
                   period_end: datetime, now: datetime | None = None) -> Forecast:
    now = now or timezone.now()
    now = min(max(now, period_start), period_end)
    elapsed = Decimal((now - period_start).total_seconds()) / 86400
    remaining = Decimal((period_end - now).total_seconds()) / 86400
    days_left = (period_end - now).days + (1 if (period_end - now).seconds or (period_end - now).microseconds else 0)
    used_pos = max(0, used)
    # Less than an hour in, a pace would be noise: project nothing yet.
    pace = (Decimal(used_pos) / elapsed) if elapsed >= Decimal(1) / 24 else Decimal(0)
    projected = min(max(cap, used_pos), used_pos + int(pace * remaining))
    reached_at = None
    already = limit > 0 and used_pos >= limit
    if not already and pace > 0 and limit > 0:
        seconds = (Decimal(limit - used_pos) / pace) * 86400
        moment = now + timedelta(seconds=float(seconds))
        reached_at = moment if moment < period_end else None
    overage = max(0, projected - limit)
    charge = (Decimal(overage) * Decimal(overage_rate)).quantize(Decimal("0.01"), ROUND_HALF_UP)
    return Forecast(pace.quantize(Decimal("1"), ROUND_HALF_UP), projected, reached_at, already, overage, charge,
                    max(0, days_left))


# --- the support console -------------------------------------------------------------------------

def accounts_for_console(*, now: datetime | None = None):
    """Accounts with their current period's figures, for the admin list (one query)."""
    now = now or timezone.now()
    current = UsagePeriod.objects.filter(account=OuterRef("pk"), starts_at__lte=now, ends_at__gt=now).order_by("-starts_at")
    return (Account.objects.select_related("user", "tier")
            .annotate(current_used=Subquery(current.values("used")[:1]),
                      current_limit=Subquery(current.values("token_limit")[:1]),
                      current_end=Subquery(current.values("ends_at")[:1])))


def reservations_held(*, account: Account) -> QuerySet[Reservation]:
    """The account's reservations still holding tokens, oldest first."""
    return Reservation.objects.filter(account=account, status=Reservation.Status.HELD).order_by("created_at")


@dataclass(frozen=True)
class SupportNumbers:
    tokens_today: int
    requests_today: int
    accounts_over_90: int
    overage_tokens: int
    overage_accrued: Decimal
    extra: dict[str, int] = field(default_factory=dict)


def support_numbers(*, now: datetime | None = None) -> SupportNumbers:
    """The numbers support looks at first: bounded by today's rows and open periods."""
    now = now or timezone.now()
    today = now.astimezone(dt_timezone.utc).date()
    groups = usage_groups(account_id=None, since=today, until=today, kind=CONSUMPTION)
    open_periods = UsagePeriod.objects.filter(starts_at__lte=now, ends_at__gt=now)
    over_90 = (open_periods.filter(token_limit__gt=0).alias(used10=F("used") * 10)
               .filter(used10__gte=F("token_limit") * 9).values("account").distinct().count())
    overage_expr = Greatest(F("used") - F("token_limit"), Value(0))
    money = DecimalField(max_digits=20, decimal_places=6)
    agg = open_periods.aggregate(
        tokens=Coalesce(Sum(overage_expr), Value(0)),
        charge=Coalesce(Sum(ExpressionWrapper(overage_expr * F("overage_rate"), output_field=money)),
                        Value(Decimal(0)), output_field=money))
    return SupportNumbers(sum(g.used_delta for g in groups), sum(g.entries for g in groups), over_90,
                          int(agg["tokens"]), Decimal(agg["charge"]).quantize(Decimal("0.01"), ROUND_HALF_UP))


@dataclass(frozen=True)
class ProviderAccuracy:
    provider: str
    samples: int
    recent_error: Decimal | None  # sample-weighted mean of its calibrations' recent errors


def estimate_accuracy_by_provider() -> list[ProviderAccuracy]:
    """Each calibrated provider's learnt samples and recent estimate error, over its
    any-model calibrations (one per script class): each sample teaches exactly one."""
    totals: dict[str, list] = {}
    for provider, samples, error in Calibration.objects.filter(model="").values_list(
            "provider", "samples", "recent_error"):
        n, weighted, weight = totals.setdefault(provider, [0, Decimal(0), 0])
        totals[provider][0] = n + samples
        if error is not None:
            totals[provider][1] = weighted + error * samples
            totals[provider][2] = weight + samples
    return [ProviderAccuracy(provider, n, (weighted / weight).quantize(Decimal("0.00001")) if weight else None)
            for provider, (n, weighted, weight) in sorted(totals.items())]
