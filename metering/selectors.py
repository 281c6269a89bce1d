"""Reads: the API, the dashboard and admin go through these."""
from __future__ import annotations

from datetime import date, datetime, time, timedelta, timezone as dt_timezone

from django.db.models import QuerySet

from .models import LedgerEntry


def _as_datetime(value: date | datetime, *, end: bool = False) -> datetime:
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=dt_timezone.utc)
    start = datetime.combine(value, time.min, tzinfo=dt_timezone.utc)
    return start + timedelta(days=1) if end else start


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
