"""Rolling periods over: close the periods that have ended and open the next.

A request after a period's end opens the next period itself (period_current), so
nothing waits for this; the job marks the old period closed, makes sure every
account has its current period, and announces each period it closed
(`period_closed`: alerts sends the summaries). Safe to run twice or concurrently: ended periods
are locked with SKIP LOCKED, so two runs split the work, and opening a period
is idempotent under its unique (account, starts_at)."""
from __future__ import annotations

from datetime import datetime

from django.db import transaction
from django.utils import timezone

from ..models import Account, UsagePeriod
from ..signals import period_closed
from .accounts import period_current


def periods_rollover(*, now: datetime | None = None, limit: int = 500) -> list[tuple[UsagePeriod, UsagePeriod]]:
    """Close up to `limit` ended periods; returns (closed, current) pairs."""
    now = now or timezone.now()
    rolled = []
    with transaction.atomic():
        ended = list(UsagePeriod.objects.select_for_update(skip_locked=True)
                     .filter(closed_at__isnull=True, ends_at__lte=now).order_by("ends_at", "pk")[:limit])
        accounts = Account.objects.select_related("tier").in_bulk({p.account_id for p in ended})
        for period in ended:
            period.closed_at = now
            period.save(update_fields=["closed_at", "updated_at"])
            period_closed.send(sender=UsagePeriod, period=period)
            rolled.append((period, period_current(account=accounts[period.account_id], now=now)))
    return rolled
