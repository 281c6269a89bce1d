"""The dashboard and the analytics endpoints cost the same number of queries for
a user with 10 days of history as for one with 10,000 days."""
from __future__ import annotations

import pytest
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from metering.models import LedgerEntry
from metering.services import ledger_rollup_refresh

from .conftest import write_history

pytestmark = pytest.mark.within_one_period  # slow steps or processes of their own: start clear of a month's end

PAGES = [
    "/dashboard/",
    "/dashboard/?op=analysis&since={month_ago}",
    "/api/tokens/usage",
    "/api/tokens/analytics/daily?from={year_ago}&to={today}",
    "/api/tokens/analytics/daily?groupBy=operationType",
    "/api/tokens/reports/monthly?month={month}",
]


def _counts(client: Client) -> dict[str, int]:
    today = timezone.now().date()
    values = {"today": today, "month_ago": today - timezone.timedelta(days=30),
              "year_ago": today - timezone.timedelta(days=365), "month": today.strftime("%Y-%m")}
    counts = {}
    for page in PAGES:
        url = page.format(**values)
        client.get(url)  # warm: the first request may open the period or the account
        with CaptureQueriesContext(connection) as queries:
            response = client.get(url)
        assert response.status_code == 200, (url, response.content[:300])
        counts[url] = len(queries)
    return counts


@pytest.mark.django_db
def test_same_queries_for_10_and_10000_days_of_history(make_user, consume):
    short, long = make_user("pro"), make_user("pro")
    write_history(short, days=10, per_day=2)
    write_history(long, days=10_000, per_day=2)
    assert LedgerEntry.objects.filter(account__user=long).count() == 20_000
    ledger_rollup_refresh()
    for user in (short, long):  # and some rows past the rollup watermark, read live
        consume(user, 100, "analysis")
        consume(user, 50, "summary")
    clients = []
    for user in (short, long):
        client = Client()
        client.force_login(user)
        clients.append(client)
    short_counts, long_counts = _counts(clients[0]), _counts(clients[1])
    assert short_counts == long_counts
    assert max(long_counts.values()) <= 25  # and a handful at that


@pytest.mark.django_db
@pytest.mark.within_one_period  # "today" must not change between writing history and reading it
def test_the_long_history_figures_are_right(make_user):
    user = make_user("pro")
    write_history(user, days=10_000, per_day=1, tokens=3)
    ledger_rollup_refresh()
    client = Client()
    client.force_login(user)
    today = timezone.now().date()
    body = client.get(f"/api/tokens/analytics/daily?from={today - timezone.timedelta(days=1000)}&to={today}").json()
    assert len(body) == 1000 and all(d["totalTokens"] == 3 and d["requestCount"] == 1 for d in body)
    periods = user.token_account.periods.count()
    assert periods >= 328
