"""Period rollover at the boundary with its summary e-mail, and the weekly digest.
(Rollover alone, concurrent runs included: tests/metering/test_housekeeping.py.)"""
from __future__ import annotations

from datetime import datetime, timezone as dt_timezone

import pytest
import time_machine
from django.core import mail

from alerts.models import AlertEvent
from alerts.services import alert_preferences_update
from alerts.tasks import weekly_digest_task
from metering.models import UsagePeriod
from metering.services import account_for_user
from metering.tasks import rollover_task

from .conftest import html_of, outbox_for

pytestmark = pytest.mark.django_db


def at(*args) -> datetime:
    return datetime(*args, tzinfo=dt_timezone.utc)


def test_rollover_at_the_boundary_closes_opens_and_summarises_once(consume, make_user, on_commit):
    user = make_user("basic")  # 10,000 tokens, $0.001 per overage token
    with time_machine.travel(at(2026, 10, 12, 9), tick=False):
        consume(user, 3_000, "summary")
        consume(user, 1_000, "analysis")
    with time_machine.travel(at(2026, 11, 10, 9), tick=False):
        for tokens, op in [(3_000, "consensus"), (2_500, "analysis"), (3_000, "consensus"), (2_000, "summary"),
                           (500, "analysis")]:
            consume(user, tokens, op)
    mail.outbox.clear()
    account = account_for_user(user_id=user.pk)

    just_before = at(2026, 11, 30, 23, 59, 59)
    with time_machine.travel(just_before, tick=False):
        on_commit(rollover_task.delay)
    # only October (ended a month ago, too long ago for a summary) is closed
    assert mail.outbox == []
    assert list(UsagePeriod.objects.filter(account=account, closed_at__isnull=False).values_list(
        "starts_at", "closed_at")) == [(at(2026, 10, 1), just_before)]

    boundary = at(2026, 12, 1, 0, 0)
    with time_machine.travel(boundary, tick=False):
        on_commit(rollover_task.delay)
        on_commit(rollover_task.delay)  # a second run changes nothing
    november = UsagePeriod.objects.get(account=account, starts_at=at(2026, 11, 1))
    december = UsagePeriod.objects.get(account=account, starts_at=boundary)
    assert november.closed_at == boundary and november.used == 11_000
    assert december.ends_at == at(2027, 1, 1) and december.used == 0 and december.token_limit == 10_000

    [summary] = outbox_for(user.email)
    assert summary.subject == "Your usage summary for Nov 1 – Nov 30, 2026: 11,000 tokens"
    body = summary.body
    assert "Tokens used:     11,000 of 10,000 (110%)" in body
    assert "Overage:         1,000 tokens, charge $1.00" in body
    assert "Previous period: 4,000 tokens (Oct 1 – Oct 31), +175.0% this period" in body
    assert "1. consensus: 6,000 tokens in 2 operations (54.5%)" in body
    assert "2. analysis: 3,000 tokens in 2 operations (27.3%)" in body
    assert "3. summary: 2,000 tokens in 1 operation (18.2%)" in body
    assert "http://127.0.0.1:8000/dashboard/" in body and "/alerts/unsubscribe/" in body
    assert "+175.0%" in html_of(summary) and "6,000 tokens" in html_of(summary)
    event = AlertEvent.objects.get(kind="period_summary")
    assert event.period_id == november.pk and event.status == "sent"


def test_a_period_opened_by_a_request_is_still_closed_and_summarised(consume, make_user, on_commit):
    user = make_user("pro")
    with time_machine.travel(at(2026, 11, 20), tick=False):
        consume(user, 100)
    with time_machine.travel(at(2027, 1, 3), tick=False):  # a month and more later, the job late
        consume(user, 50)  # opens January itself
        on_commit(rollover_task.delay)
        periods = list(UsagePeriod.objects.filter(account__user=user).order_by("starts_at"))
    # November was closed; December never existed (nobody used it); January is current
    assert [(p.starts_at.month, p.closed_at is not None, p.used) for p in periods] == [(11, True, 100), (1, False, 50)]
    assert mail.outbox == []  # November ended more than ALERTS_SUMMARY_LOOKBACK_DAYS ago


def test_weekly_digest_goes_to_users_at_or_above_75_percent_once_a_week(consume, make_user, on_commit):
    sunday = at(2026, 11, 29, 10, 0)
    alice, bob, carol = make_user("basic"), make_user("basic"), make_user("basic")
    with time_machine.travel(at(2026, 11, 20, 12), tick=False):
        consume(alice, 6_000)
        consume(bob, 5_000)
        consume(carol, 7_600)
    with time_machine.travel(at(2026, 11, 25, 12), tick=False):
        consume(alice, 2_000)  # 80%, 2,000 of it this week
    alert_preferences_update(user=carol, weekly_digest=False)
    mail.outbox.clear()

    with time_machine.travel(sunday, tick=False):
        on_commit(weekly_digest_task.delay)
        on_commit(weekly_digest_task.delay)
    with time_machine.travel(at(2026, 11, 30, 8), tick=False):  # a late run on Monday: same week
        on_commit(weekly_digest_task.delay)

    assert [m.subject for m in mail.outbox] == ["Weekly usage digest: 80% of your tokens used"]
    digest = mail.outbox[0]
    assert digest.to == [alice.email]
    assert "This week:        2,000 tokens" in digest.body and "Days left:        1" in digest.body
    assert "8,000 of 10,000 tokens (80%)" in digest.body and "/alerts/unsubscribe/" in digest.body
    events = {e.account.user_id: e for e in AlertEvent.objects.filter(kind="weekly_digest")}
    assert set(events) == {alice.pk, carol.pk}
    assert events[alice.pk].week.isoformat() == "2026-11-29" and events[alice.pk].status == "sent"
    assert events[carol.pk].status == "skipped" and "weekly digest" in events[carol.pk].last_error

    with time_machine.travel(at(2026, 12, 6, 10), tick=False):  # next Sunday: a new period, alice at 0%
        on_commit(weekly_digest_task.delay)
    assert len(mail.outbox) == 1
