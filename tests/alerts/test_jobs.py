"""Alerts' periodic jobs: resending what was recorded but not sent, and the summary
of a period billing cut short. (Cleanup, reconciliation and locks moved to
tests/metering/test_housekeeping.py; the schedule to tests/kernel.)"""
from __future__ import annotations

from datetime import datetime, timedelta, timezone as dt_timezone

import pytest
import time_machine
from django.core import mail

from alerts.models import AlertEvent, AnomalyFlag
from alerts.services import alerts_send_pending
from metering.services import account_for_user, period_align, period_current
from metering.tasks import rollover_task

NOW = datetime(2026, 11, 10, 2, 0, tzinfo=dt_timezone.utc)


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
        # billing closes the period when it cuts it short; the summary goes with that commit
        on_commit(period_align, account=account, starts_at=new_start, ends_at=new_start + timedelta(days=30))
        on_commit(rollover_task.delay)  # the rollover after it sends nothing again
        on_commit(rollover_task.delay)
    [summary] = mail.outbox
    assert summary.subject == "Your usage summary for Nov 1 – Nov 12, 2026: 1,234 tokens"
