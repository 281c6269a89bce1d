"""Reads for alerts: e-mail figures, preferences, the alert history. The dashboard
and admin read through these."""
from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime, timedelta
from decimal import Decimal

from django.db.models import Count, QuerySet, Sum
from django.db.models.functions import Coalesce

from metering.models import LedgerEntry, UsagePeriod
from metering.services import Usage, usage_of

from .models import AlertEvent, AnomalyFlag, EmailPreference

PREFERENCE_KINDS = ("usage_alerts", "weekly_digest", "period_summary")
PREFERENCE_LABELS = {"usage_alerts": "usage alert", "weekly_digest": "weekly digest",
                     "period_summary": "period summary"}


@dataclass(frozen=True)
class Preferences:
    usage_alerts: bool = True
    weekly_digest: bool = True
    period_summary: bool = True

    def as_dict(self) -> dict[str, bool]:
        return {kind: getattr(self, kind) for kind in PREFERENCE_KINDS}


def alert_preferences_get(*, user) -> Preferences:
    """Which usage e-mails the user gets (all of them unless turned off)."""
    row = EmailPreference.objects.filter(user=user).first()
    if row is None:
        return Preferences()
    return Preferences(**{kind: getattr(row, kind) for kind in PREFERENCE_KINDS})


def alert_events_for_user(*, user) -> QuerySet[AlertEvent]:
    return AlertEvent.objects.filter(account__user=user).select_related("period").order_by("-created_at", "-id")


def anomaly_flags_open() -> QuerySet[AnomalyFlag]:
    return AnomalyFlag.objects.filter(status=AnomalyFlag.Status.OPEN).select_related("account__user")


def period_usage(period: UsagePeriod) -> Usage:
    """The period as the dashboard shows it (tier slug included)."""
    tier = period.account.tier
    return usage_of(period, tier.slug if tier else None)


@dataclass(frozen=True)
class OperationTotal:
    operation_type: str
    tokens: int
    operations: int
    share: Decimal  # % of the period's consumption


def busiest_operation_types(period: UsagePeriod, *, top: int = 3) -> list[OperationTotal]:
    rows = list(LedgerEntry.objects.filter(period=period, kind=LedgerEntry.Kind.CONSUMPTION)
                .values("operation_type").annotate(tokens=Coalesce(Sum("used_delta"), 0), operations=Count("id"))
                .order_by("-tokens", "operation_type"))
    total = sum(r["tokens"] for r in rows) or 1
    return [OperationTotal(r["operation_type"] or "(none)", r["tokens"], r["operations"],
                           (Decimal(r["tokens"] * 100) / total).quantize(Decimal("0.1")))
            for r in rows[:top]]


def previous_period(period: UsagePeriod) -> UsagePeriod | None:
    return (UsagePeriod.objects.filter(account_id=period.account_id, starts_at__lt=period.starts_at)
            .order_by("-starts_at").first())


def tokens_consumed_between(*, account_id: int, since: datetime, until: datetime) -> int:
    return LedgerEntry.objects.filter(account_id=account_id, kind=LedgerEntry.Kind.CONSUMPTION,
                                      created_at__gte=since, created_at__lt=until).aggregate(
        total=Coalesce(Sum("used_delta"), 0))["total"]


def change_percentage(current: int, before: int) -> Decimal | None:
    """+25.0 for a quarter more than before; None when there is nothing to compare with."""
    if before <= 0:
        return None
    return (Decimal((current - before) * 100) / before).quantize(Decimal("0.1"))


def digest_sunday(moment: datetime) -> date:
    """The Sunday a weekly digest sent at `moment` belongs to: that day on a
    Sunday, the Sunday before on any other day (so a late run keys the same)."""
    return moment.date() - timedelta(days=(moment.weekday() + 1) % 7)
