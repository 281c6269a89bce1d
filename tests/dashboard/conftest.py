"""Helpers for the dashboard tests: history written the way the ledger holds it
(periods, ledger rows and the counters that cache them), and real consumes."""
from __future__ import annotations

import itertools
import random
from datetime import datetime, timedelta, timezone as dt_timezone

import pytest
from django.db.models import F

from metering.models import Account, LedgerEntry, UsagePeriod
from metering.periods import calendar_month
from metering.services import SYSTEM, ConsumeRequest, account_terms, usage_consume

OPERATIONS = ["consensus", "analysis", "summary", "comparison"]
MODELS = [("openai", "gpt-4o"), ("anthropic", "claude-sonnet-4")]
_ops = itertools.count(1)


def write_history(user, *, days: int, per_day: int = 1, end: datetime | None = None, seed: int = 1,
                  tokens: int = 10) -> int:
    """Consumptions on each of the `days` days before `end` (exclusive of end's day
    minus nothing: the last day is the day before `end`), in calendar-month periods
    with counters equal to the ledger. Returns the number of rows written."""
    rng = random.Random(seed)
    account = Account.objects.get(user=user)
    limit, cap, rate = account_terms(account)
    end = end or datetime.now(dt_timezone.utc).replace(hour=0, minute=0, second=0, microsecond=0)
    periods: dict[datetime, UsagePeriod] = {}
    rows = []
    used: dict[int, int] = {}
    for d in range(days, 0, -1):
        day = end - timedelta(days=d)
        start, stop = calendar_month(day)
        period = periods.get(start)
        if period is None:
            period, _ = UsagePeriod.objects.get_or_create(
                account=account, starts_at=start,
                defaults={"ends_at": stop, "token_limit": limit, "cap": cap, "overage_rate": rate})
            periods[start] = period
        for i in range(per_day):
            provider, model = MODELS[i % len(MODELS)]
            rows.append(LedgerEntry(
                account=account, period=period, kind=LedgerEntry.Kind.CONSUMPTION, used_delta=tokens,
                operation_id=f"hist-{next(_ops)}", operation_type=OPERATIONS[rng.randrange(len(OPERATIONS))],
                provider=provider, model=model, actual_tokens=tokens,
                created_at=day + timedelta(hours=1 + (i % 20), minutes=rng.randrange(60))))
            used[period.pk] = used.get(period.pk, 0) + tokens
    LedgerEntry.objects.bulk_create(rows, batch_size=5000)
    for pk, extra in used.items():
        UsagePeriod.objects.filter(pk=pk).update(used=F("used") + extra)
    return len(rows)


@pytest.fixture
def consume():
    """consume(user, tokens, operation_type, provider, model) through the real service."""

    def consume(user, tokens: int, operation_type: str = "summary", provider: str = "openai",
                model: str = "gpt-4o"):
        return usage_consume(request=ConsumeRequest(user_id=user.pk, operation_id=f"op-{next(_ops)}", tokens=tokens,
                                                    operation_type=operation_type, provider=provider, model=model),
                             ctx=SYSTEM)

    return consume
