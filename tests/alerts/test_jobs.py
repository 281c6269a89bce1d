"""Cleanup, reconciliation, the schedule, and one-run-at-a-time locks."""
from __future__ import annotations

import threading
from datetime import datetime, timedelta, timezone as dt_timezone
from io import StringIO

import pytest
import time_machine
from django.core import mail
from django.core.management import call_command
from django.db import connection
from django_celery_beat.models import PeriodicTask
from djstripe.models import WebhookEventTrigger

from alerts.locks import job_lock
from alerts.models import AlertEvent, AnomalyFlag
from alerts.services import alerts_send_pending
from alerts.tasks import cleanup_task, reconcile_task, rollover_task
from billing.tasks import PERIODIC as BILLING_PERIODIC
from metering.models import AuditLog, LedgerEntry, Reservation, UsagePeriod
from metering.services import (
    RequestContext,
    account_for_user,
    ledger_reconcile,
    period_align,
    period_current,
    usage_check,
)

NOW = datetime(2026, 11, 10, 2, 0, tzinfo=dt_timezone.utc)


@pytest.mark.django_db
def test_cleanup_expires_stale_reservations_and_prunes_by_retention(make_user, settings):
    settings.AUDIT_RETENTION_DAYS, settings.WEBHOOK_RETENTION_DAYS = 30, 7
    user = make_user("basic")
    with time_machine.travel(NOW - timedelta(minutes=20), tick=False):
        stale = usage_check(user_id=user.pk, tokens=700, ctx=RequestContext(actor="t"), reserve=True).reservation
        old_audit = AuditLog.objects.create(action="consume", result="recorded", created_at=NOW - timedelta(days=31))
    with time_machine.travel(NOW - timedelta(minutes=5), tick=False):
        fresh = usage_check(user_id=user.pk, tokens=300, ctx=RequestContext(actor="t"), reserve=True).reservation
    recent_audit = AuditLog.objects.create(action="consume", result="recorded", created_at=NOW - timedelta(days=29))
    old_hook = WebhookEventTrigger.objects.create(remote_ip="127.0.0.1", headers={}, body="{}")
    new_hook = WebhookEventTrigger.objects.create(remote_ip="127.0.0.1", headers={}, body="{}")
    WebhookEventTrigger.objects.filter(pk=old_hook.pk).update(created=NOW - timedelta(days=8))
    WebhookEventTrigger.objects.filter(pk=new_hook.pk).update(created=NOW - timedelta(days=6))
    ledger_rows = LedgerEntry.objects.count()

    with time_machine.travel(NOW, tick=False):
        result = cleanup_task.delay().get()
        again = cleanup_task.delay().get()
    assert result["reservations_expired"] == 1 and result["webhook_payloads_pruned"] == 1
    assert result["audit_rows_pruned"] == 1
    assert again == {"reservations_expired": 0, "audit_rows_pruned": 0, "webhook_payloads_pruned": 0}
    stale.refresh_from_db()
    fresh.refresh_from_db()
    assert stale.status == Reservation.Status.EXPIRED and fresh.status == Reservation.Status.HELD
    assert UsagePeriod.objects.get(pk=stale.period_id).reserved == 300
    # the release is a ledger row; nothing was taken from the ledger
    assert LedgerEntry.objects.count() == ledger_rows + 1
    assert LedgerEntry.objects.filter(kind="release", reservation=stale, reserved_delta=-700).exists()
    assert not AuditLog.objects.filter(pk=old_audit.pk).exists() and AuditLog.objects.filter(pk=recent_audit.pk).exists()
    assert list(WebhookEventTrigger.objects.values_list("pk", flat=True)) == [new_hook.pk]
    assert ledger_reconcile() == []


@pytest.mark.django_db
def test_reconciliation_mails_staff_only_when_counters_drift(make_user, consume):
    user = make_user("basic")
    consume(user, 1_000)
    assert reconcile_task.delay().get() == 0 and mail.outbox == []
    period = period_current(account=account_for_user(user_id=user.pk))
    UsagePeriod.objects.filter(pk=period.pk).update(used=1_250)  # a counter that lies
    assert reconcile_task.delay().get() == 1
    [report] = mail.outbox
    assert report.subject.endswith("Ledger drift in 1 period(s)") and report.to == ["staff@consensus.local"]
    assert f"{period.pk}  {user.pk}  1250 / 1000  0 / 0" in report.body


@pytest.mark.django_db
def test_setup_periodic_tasks_is_idempotent_and_keeps_staff_edits():
    call_command("setup_periodic_tasks", stdout=StringIO())
    call_command("setup_periodic_tasks", stdout=StringIO())
    tasks = {t.name: t for t in PeriodicTask.objects.select_related("crontab", "interval")}
    assert set(tasks) == {"cleanup", "period rollover", "weekly digest", "reconciliation", "anomaly detection",
                          "send pending alerts", "ledger rollup refresh", "ledger rollup verify",
                          *BILLING_PERIODIC}
    assert tasks["ledger rollup refresh"].interval.every == 60
    assert tasks["billing: bill ended periods' overage"].task == "billing.tasks.overage_bill_ended_periods_task"

    def cron(name):
        c = tasks[name].crontab
        return (c.minute, c.hour, c.day_of_week, c.day_of_month, c.month_of_year, str(c.timezone))

    assert cron("cleanup") == ("0", "2", "*", "*", "*", "UTC")
    assert cron("period rollover") == ("1", "*", "*", "*", "*", "UTC")
    assert cron("weekly digest") == ("0", "10", "0", "*", "*", "UTC")
    assert cron("reconciliation")[:2] == ("30", "3") and cron("anomaly detection")[:2] == ("5", "*")
    assert tasks["send pending alerts"].interval.every == 300 and tasks["cleanup"].task == "alerts.cleanup"

    cleanup = tasks["cleanup"]
    cleanup.enabled = False
    cleanup.save()
    call_command("setup_periodic_tasks", stdout=StringIO())
    assert PeriodicTask.objects.get(name="cleanup").enabled is False  # a staff edit survives a deploy
    call_command("setup_periodic_tasks", "--reset", stdout=StringIO())
    assert PeriodicTask.objects.get(name="cleanup").enabled is True
    assert PeriodicTask.objects.filter(name__in=tasks).count() == 8 + len(BILLING_PERIODIC)


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
def test_resend_job_sends_what_was_recorded_but_not_sent(make_user, settings):
    """An alert whose send task never ran (broker down at commit) is sent by the
    periodic job once past the grace period; a failed SMTP send is retried."""
    settings.ALERTS_RESEND_GRACE_SECONDS = 60
    user = make_user("basic")
    account = account_for_user(user_id=user.pk)
    period = period_current(account=account)
    event = AlertEvent.objects.create(account=account, period=period, kind="threshold", threshold=90,
                                      recipient=user.email, created_at=NOW)
    with time_machine.travel(NOW + timedelta(seconds=30), tick=False):
        assert alerts_send_pending().sent == 0  # its own task may still be on the way
    settings.EMAIL_BACKEND = "django.core.mail.backends.smtp.EmailBackend"
    settings.EMAIL_HOST, settings.EMAIL_PORT, settings.EMAIL_TIMEOUT = "127.0.0.1", 9, 1  # nothing listens
    with time_machine.travel(NOW + timedelta(seconds=90), tick=False):
        assert alerts_send_pending().failed == 1
    event.refresh_from_db()
    assert event.status == "pending" and event.attempts == 1 and "Error" in event.last_error
    settings.EMAIL_BACKEND = "django.core.mail.backends.locmem.EmailBackend"
    with time_machine.travel(NOW + timedelta(seconds=120), tick=False):
        assert alerts_send_pending().sent == 1
        assert alerts_send_pending().sent == 0
    event.refresh_from_db()
    assert event.status == "sent" and event.attempts == 2 and len(mail.outbox) == 1


@pytest.mark.django_db
def test_admin_lists_alerts_and_requeues_failed_ones(make_user, admin_client, django_capture_on_commit_callbacks):
    user = make_user("basic")
    account = account_for_user(user_id=user.pk)
    period = period_current(account=account)
    failed = AlertEvent.objects.create(account=account, period=period, kind="threshold", threshold=75,
                                       recipient=user.email, created_at=NOW, status="failed", attempts=8,
                                       last_error="SMTPServerDisconnected")
    page = admin_client.get("/admin/alerts/alertevent/")
    assert page.status_code == 200 and user.email in page.content.decode()
    assert admin_client.get(f"/admin/alerts/alertevent/{failed.pk}/change/").status_code == 200
    with django_capture_on_commit_callbacks(execute=True):
        response = admin_client.post("/admin/alerts/alertevent/", {"action": "send_again",
                                                                   "_selected_action": [failed.pk]})
    assert response.status_code == 302
    failed.refresh_from_db()
    assert failed.status == "sent" and failed.attempts == 1 and len(mail.outbox) == 1
    assert admin_client.get("/admin/alerts/emailpreference/").status_code == 200


@pytest.mark.django_db
def test_resend_job_takes_over_a_dead_workers_claim_and_unsent_staff_notices(make_user, consume, settings):
    settings.ALERTS_CLAIM_STALE_SECONDS, settings.ALERTS_RESEND_GRACE_SECONDS = 600, 60
    settings.ANOMALY_MIN_TOKENS = 1
    user = make_user("basic")
    account = account_for_user(user_id=user.pk)
    period = period_current(account=account)
    claimed = AlertEvent.objects.create(account=account, period=period, kind="threshold", threshold=75,
                                        recipient=user.email, created_at=NOW, status="sending", claimed_at=NOW,
                                        attempts=1)
    flag = AnomalyFlag.objects.create(account=account, rule="spike", window_start=NOW, window_end=NOW, observed=9,
                                      baseline=0, multiplier=5, minimum=1, created_at=NOW)
    with time_machine.travel(NOW + timedelta(seconds=300), tick=False):
        result = alerts_send_pending()
    assert (result.sent, result.staff_notified) == (0, 1)  # the claim may still be sending
    assert [m.to for m in mail.outbox] == [["staff@consensus.local"]]
    with time_machine.travel(NOW + timedelta(seconds=601), tick=False):
        result = alerts_send_pending()
    claimed.refresh_from_db()
    flag.refresh_from_db()
    assert (result.sent, result.staff_notified) == (1, 0) and claimed.status == "sent" and claimed.attempts == 2
    assert flag.notified_at == NOW + timedelta(seconds=300) and len(mail.outbox) == 2


@pytest.mark.django_db
def test_a_period_cut_short_by_billing_is_summarised(make_user, consume, on_commit):
    user = make_user("pro")
    with time_machine.travel(NOW, tick=False):
        consume(user, 1_234)
    account = account_for_user(user_id=user.pk)
    new_start = NOW + timedelta(days=2)
    with time_machine.travel(new_start, tick=False):
        period_align(account=account, starts_at=new_start, ends_at=new_start + timedelta(days=30))
        on_commit(rollover_task.delay)
        on_commit(rollover_task.delay)
    [summary] = mail.outbox
    assert summary.subject == "Your usage summary for Nov 1 – Nov 12, 2026: 1,234 tokens"
