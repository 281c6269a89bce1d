"""Exactly once under concurrency, on real PostgreSQL with real commits."""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from django.core import mail
from django.db import connection, transaction
from rest_framework.test import APIClient

from alerts.models import AlertEvent
from alerts.services import alert_crossings_record, alert_deliver
from metering.models import AuditLog, UsagePeriod
from metering.services import account_for_user, ledger_reconcile, period_current, usage_adjust

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.within_one_period]
THREADS = 32


def _in_threads(func, count: int = THREADS) -> list:
    barrier = threading.Barrier(count)

    def run(i):
        try:
            barrier.wait(timeout=30)
            return func(i)
        finally:
            connection.close()

    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(run, range(count)))


def test_32_concurrent_consumes_crossing_90_percent_mail_once(make_user, service_key):
    user = make_user("basic")  # limit 10,000
    usage_adjust(account=account_for_user(user_id=user.pk), tokens=8_800, reason="history", actor="tests")
    mail.outbox.clear()  # the 75% e-mail of the setup

    def consume(i):
        client = APIClient()
        client.credentials(HTTP_AUTHORIZATION=f"Api-Key {service_key}")
        response = client.post("/api/tokens/consume", {"userId": user.pk, "operationId": f"race-{i}",
                                                       "tokens": 10, "operationType": "summary"}, format="json")
        return response.status_code

    # 8,800 + 32 x 10 = 9,120: each consume could be the one that reaches 9,000
    assert _in_threads(consume) == [201] * THREADS
    ninety = AlertEvent.objects.filter(account__user=user, threshold=90)
    assert ninety.count() == 1 and ninety.get().status == "sent"
    assert [m.subject for m in mail.outbox] == ["You have used 90% of your tokens this period"]
    assert UsagePeriod.objects.get(account__user=user).used == 9_120
    assert ledger_reconcile() == []


def test_32_transactions_recording_the_same_crossing_insert_one_row_and_all_commit(make_user):
    """The constraint is the backstop: even if every transaction believed it
    crossed 90%, one row is written and no transaction is broken by the duplicate."""
    user = make_user("basic")
    account = account_for_user(user_id=user.pk)
    period = period_current(account=account)
    period.used = 9_050

    def record(i):
        with transaction.atomic():
            events = alert_crossings_record(period=period, used_before=8_950)
            # the transaction goes on after a duplicate was ignored
            AuditLog.objects.create(user_id=user.pk, action="probe", result=str(i), created_at=period.starts_at)
        return len(events)

    assert sum(_in_threads(record)) == 1
    assert AlertEvent.objects.filter(account=account, threshold=90).count() == 1
    assert AuditLog.objects.filter(action="probe").count() == THREADS
    assert len(mail.outbox) == 1


def test_concurrent_deliveries_of_one_alert_send_one_email(make_user):
    user = make_user("basic")
    account = account_for_user(user_id=user.pk)
    period = period_current(account=account)
    period.used = 9_000
    with transaction.atomic():
        [event] = alert_crossings_record(period=period, used_before=8_999)
        transaction.set_rollback(False)
    # the on_commit send ran already; make it pending again to race the senders
    mail.outbox.clear()
    AlertEvent.objects.filter(pk=event.pk).update(status="pending", sent_at=None)

    results = _in_threads(lambda i: alert_deliver(event_id=event.pk), count=8)
    assert set(results) <= {"sent", "busy"} and "sent" in results
    assert len(mail.outbox) == 1
    # a worker retry after success changes nothing
    assert alert_deliver(event_id=event.pk) == "sent" and len(mail.outbox) == 1
