"""Metering's periodic jobs (metering/services/housekeeping.py, metering/tasks.py):
reservation expiry, cleanup, rollover, reconciliation, and one run at a time. Moved from tests/alerts."""
from __future__ import annotations

import threading
from datetime import datetime, timedelta, timezone as dt_timezone

import pytest
import time_machine
from django.core import mail
from django.db import connection

from consensus_tokens.jobs import job_lock
from metering.models import AuditLog, LedgerEntry, Reservation, UsagePeriod
from metering.services import (
    RequestContext,
    account_for_user,
    ledger_reconcile,
    period_current,
    periods_rollover,
    usage_check,
)
from metering.tasks import cleanup_task, reconcile_task, reservations_expire_task, rollover_task

NOW = datetime(2026, 11, 10, 2, 0, tzinfo=dt_timezone.utc)


def at(*args) -> datetime:
    return datetime(*args, tzinfo=dt_timezone.utc)


@pytest.mark.django_db
def test_the_expiry_job_writes_expired_holds_to_the_ledger_once(make_user):
    user = make_user("basic")
    with time_machine.travel(NOW - timedelta(minutes=20), tick=False):
        stale = usage_check(user_id=user.pk, tokens=700, ctx=RequestContext(actor="t"), reserve=True).reservation
    with time_machine.travel(NOW - timedelta(minutes=6), tick=False):  # before the first expires
        fresh = usage_check(user_id=user.pk, tokens=300, ctx=RequestContext(actor="t"), reserve=True).reservation
    ledger_rows = LedgerEntry.objects.count()

    with time_machine.travel(NOW, tick=False):
        assert reservations_expire_task.delay().get() == 1
        assert reservations_expire_task.delay().get() == 0
    stale.refresh_from_db()
    fresh.refresh_from_db()
    assert stale.status == Reservation.Status.EXPIRED and fresh.status == Reservation.Status.HELD
    assert UsagePeriod.objects.get(pk=stale.period_id).reserved == 300
    # the release is a ledger row (and an audit row); nothing was taken from the ledger
    assert LedgerEntry.objects.count() == ledger_rows + 1
    assert LedgerEntry.objects.filter(kind="release", reservation=stale, reserved_delta=-700, reason="expired").exists()
    assert AuditLog.objects.filter(action="release", result="expired", actor="cleanup",
                                   detail__reservationId=str(stale.pk)).count() == 1
    assert ledger_reconcile() == []


@pytest.mark.django_db
def test_cleanup_prunes_audit_rows_by_retention(settings):
    settings.AUDIT_RETENTION_DAYS = 30
    old_audit = AuditLog.objects.create(action="consume", result="recorded", created_at=NOW - timedelta(days=31))
    recent_audit = AuditLog.objects.create(action="consume", result="recorded", created_at=NOW - timedelta(days=29))
    ledger_rows = LedgerEntry.objects.count()
    with time_machine.travel(NOW, tick=False):
        assert cleanup_task.delay().get() == {"audit_rows_pruned": 1}
        assert cleanup_task.delay().get() == {"audit_rows_pruned": 0}
    assert not AuditLog.objects.filter(pk=old_audit.pk).exists() and AuditLog.objects.filter(pk=recent_audit.pk).exists()
    assert LedgerEntry.objects.count() == ledger_rows


@pytest.mark.django_db
def test_reconciliation_mails_staff_only_when_counters_drift(make_user, spend):
    user = make_user("basic")
    spend(user, 1_000)
    assert reconcile_task.delay().get() == 0 and mail.outbox == []
    period = period_current(account=account_for_user(user_id=user.pk))
    UsagePeriod.objects.filter(pk=period.pk).update(used=1_250)  # a counter that lies
    assert reconcile_task.delay().get() == 1
    [report] = mail.outbox
    assert report.subject.endswith("Ledger drift in 1 period(s)") and report.to == ["staff@consensus.local"]
    assert f"{period.pk}  {user.pk}  1250 / 1000  0 / 0" in report.body
    assert "cap" not in report.body


@pytest.mark.django_db
def test_reconciliation_mails_staff_periods_past_their_cap(make_user, spend):
    user = make_user("basic")  # cap 15,000
    period = period_current(account=account_for_user(user_id=user.pk))
    spend(user, 1_000)  # the PostgreSQL statement (the period exists): it stores "usageAfter"
    spend(user, 13_000)  # crosses the alert thresholds, so the ORM path: it stores the body's "usage"
    fast, orm = LedgerEntry.objects.filter(account__user=user, kind="consumption").order_by("pk")
    assert "usageAfter" in fast.response and "usage" in orm.response
    with connection.cursor() as cursor:  # what settlements past the cap left behind before they were refused
        cursor.execute("UPDATE metering_usageperiod SET cap = 10000 WHERE id = %s", [period.pk])
        cursor.execute("UPDATE metering_ledgerentry SET response = jsonb_set(response, '{usageAfter,used}', '16000')"
                       " WHERE id = %s", [fast.pk])
        cursor.execute("UPDATE metering_ledgerentry SET response = jsonb_set(response, '{usage,reserved}', '1001')"
                       " WHERE id = %s", [orm.pk])
    assert reconcile_task.delay().get() == 3
    [report] = mail.outbox
    assert report.subject.endswith("1 period(s) over their cap; 2 consumption(s) past their period's cap")
    assert f"{period.pk}  {user.pk}  14000  0  10000" in report.body
    assert f"{period.pk}  {user.pk}  {fast.pk}  {fast.operation_id}  16000  0  15000" in report.body
    assert f"{period.pk}  {user.pk}  {orm.pk}  {orm.operation_id}  14000  1001  15000" in report.body
    assert "differ from their ledger" not in report.body


@pytest.mark.django_db(transaction=True)
def test_a_job_already_running_elsewhere_is_skipped():
    holding, release = threading.Event(), threading.Event()

    def other_run():
        with job_lock("cleanup") as acquired:
            assert acquired
            holding.set()
            release.wait(10)
        connection.close()

    thread = threading.Thread(target=other_run)
    thread.start()
    assert holding.wait(10)
    try:
        assert cleanup_task.delay().get() == "skipped"
    finally:
        release.set()
        thread.join()
    assert cleanup_task.delay().get() != "skipped"


@pytest.mark.django_db
def test_rollover_closes_ended_periods_opens_the_next_and_a_second_run_changes_nothing(make_user):
    user = make_user("basic")
    with time_machine.travel(at(2026, 11, 5), tick=False):
        november = period_current(account=account_for_user(user_id=user.pk))
    with time_machine.travel(at(2026, 12, 1, 0, 1), tick=False):
        assert rollover_task.delay().get() == 1
        assert rollover_task.delay().get() == 0
    november.refresh_from_db()
    assert november.closed_at == at(2026, 12, 1, 0, 1)
    assert UsagePeriod.objects.filter(account=november.account, starts_at=at(2026, 12, 1), closed_at=None).exists()


@pytest.mark.django_db
def test_concurrent_rollover_runs_split_the_work(make_user):
    users = [make_user("basic") for _ in range(3)]
    with time_machine.travel(at(2026, 11, 5), tick=False):
        for user in users:
            period_current(account=account_for_user(user_id=user.pk))
    with time_machine.travel(at(2026, 12, 1, 1), tick=False):
        first = periods_rollover(limit=2)
        second = periods_rollover()
        assert periods_rollover() == []
    assert len(first) == 2 and len(second) == 1
    assert {c.pk for c, _ in first} | {c.pk for c, _ in second} == set(
        UsagePeriod.objects.filter(starts_at=at(2026, 11, 1)).values_list("pk", flat=True))
