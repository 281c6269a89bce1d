"""Anomaly rules on a synthetic history made of real consumes at moved times."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone as dt_timezone
from decimal import Decimal

import pytest
import time_machine
from django.core import mail

from alerts.models import AnomalyFlag
from alerts.tasks import anomalies_detect_task
from metering.models import Account, AuditLog
from metering.services import account_for_user, period_current

pytestmark = pytest.mark.django_db
DETECT_AT = datetime(2026, 11, 10, 14, 5, tzinfo=dt_timezone.utc)  # examines 13:00-14:00
WINDOW_START = datetime(2026, 11, 10, 13, 0, tzinfo=dt_timezone.utc)


def history(consume, user, *, per_hour: int, hours: int = 24) -> None:
    """`per_hour` tokens in each of the 24 hours before the examined one."""
    for h in range(hours, 0, -1):
        with time_machine.travel(WINDOW_START - timedelta(hours=h) + timedelta(minutes=30), tick=False):
            consume(user, per_hour)


def this_hour(consume, user, *amounts: int, expect: int = 201) -> None:
    for i, tokens in enumerate(amounts):
        with time_machine.travel(WINDOW_START + timedelta(minutes=5 + i), tick=False):
            consume(user, tokens, expect=expect)


@pytest.fixture
def detect(on_commit):
    def run():
        with time_machine.travel(DETECT_AT, tick=False):
            return on_commit(anomalies_detect_task.delay).get()

    return run


def test_spike_rule_flags_five_times_the_hourly_average_above_the_minimum(consume, make_user, detect, settings):
    settings.ANOMALY_MULTIPLIER, settings.ANOMALY_MIN_TOKENS, settings.ANOMALY_HOLD = 5, 5_000, False
    spiky, steady, quiet, fresh = make_user("pro"), make_user("enterprise"), make_user("basic"), make_user("pro")
    history(consume, spiky, per_hour=200)      # 4,800 over 24 h: 200/h
    this_hour(consume, spiky, 3_000, 3_000)    # 6,000 = 30x
    history(consume, steady, per_hour=2_000)   # 2,000/h
    this_hour(consume, steady, 6_000)          # 3x: normal for them
    this_hour(consume, quiet, 1_000)           # from nothing, but under the minimum
    history(consume, fresh, per_hour=1_000)
    this_hour(consume, fresh, 4_999)           # ~5x, and under the minimum
    with time_machine.travel(WINDOW_START + timedelta(hours=1, seconds=1), tick=False):
        consume(spiky, 40_000)                 # after the window: not counted in it
    mail.outbox.clear()

    flag_ids = detect()
    [flag] = AnomalyFlag.objects.all()
    assert flag_ids == [flag.pk]
    assert flag.account.user == spiky and flag.rule == "spike" and flag.status == "open" and not flag.held
    assert (flag.observed, flag.baseline, flag.multiplier, flag.minimum) == (6_000, Decimal("200"), 5, 5_000)
    assert (flag.window_start, flag.window_end) == (WINDOW_START, WINDOW_START + timedelta(hours=1))
    assert flag.details == {"observed": 6_000, "previous24h": 4_800, "hourlyAverage": "200.0000", "ratio": "30.00"}
    [notice] = mail.outbox
    assert notice.to == ["staff@consensus.local"] and "Usage spike" in notice.subject
    assert "Observed:  6000 tokens in that hour" in notice.body
    assert "Baseline:  200.0000 per hour" in notice.body and f"/admin/alerts/anomalyflag/{flag.pk}/change/" in notice.body
    assert AnomalyFlag.objects.get().notified_at == DETECT_AT

    assert detect() == [] and AnomalyFlag.objects.count() == 1 and len(mail.outbox) == 1  # run twice: once


def test_refused_burst_rule(consume, make_user, detect, settings):
    settings.ANOMALY_REFUSED_MIN, settings.ANOMALY_MULTIPLIER = 10, 5
    user = make_user("basic")  # cap 15,000
    with time_machine.travel(WINDOW_START - timedelta(hours=18), tick=False):
        consume(user, 15_000)
        consume(user, 10, expect=402)
        consume(user, 10, expect=402)  # 2 refusals in the previous 24 h
    this_hour(consume, user, *[10] * 12, expect=402)
    assert AuditLog.objects.filter(user=user, result="token_cap_exceeded").count() == 14

    detect()
    [flag] = AnomalyFlag.objects.all()
    assert flag.rule == "refused_burst" and flag.observed == 12 and flag.account.user == user
    assert flag.details["previous24h"] == 2 and flag.details["serviceKeys"] == 1


def test_hold_caps_the_user_at_the_limit_until_support_resolves(consume, make_user, detect, settings, admin_client):
    settings.ANOMALY_HOLD, settings.ANOMALY_MIN_TOKENS = True, 5_000
    user = make_user("pro")  # 50,000, cap 100,000
    history(consume, user, per_hour=100)
    this_hour(consume, user, 8_000)
    detect()
    flag = AnomalyFlag.objects.get()
    account = Account.objects.get(user=user)
    assert flag.held and account.anomaly_hold
    with time_machine.travel(DETECT_AT, tick=False):
        period = period_current(account=account)
        assert (period.token_limit, period.cap) == (50_000, 50_000)  # held to the included tokens at once
        consume(user, 39_000)  # 2,400 + 8,000 + 39,000 = 49,400
        consume(user, 1_000, expect=402)  # past the limit: no overage while held

    # Support resolves the flag while the period is still current: terms apply to open periods only.
    with time_machine.travel(DETECT_AT + timedelta(minutes=10)):
        page = admin_client.get("/admin/alerts/anomalyflag/")
        assert page.status_code == 200 and "Usage spike" in page.content.decode()
        form = admin_client.post("/admin/alerts/anomalyflag/", {"action": "resolve", "_selected_action": [flag.pk]})
        assert form.status_code == 200 and b'name="note"' in form.content
        no_note = admin_client.post("/admin/alerts/anomalyflag/", {"action": "resolve", "_selected_action": [flag.pk],
                                                                  "apply": "1", "note": ""})
        assert no_note.status_code == 200 and AnomalyFlag.objects.get().status == "open"
        done = admin_client.post("/admin/alerts/anomalyflag/", {"action": "resolve", "_selected_action": [flag.pk],
                                                               "apply": "1", "note": "Batch import agreed with the customer."})
        assert done.status_code == 302
        flag.refresh_from_db()
        account.refresh_from_db()
        assert flag.status == "resolved" and flag.resolution_note == "Batch import agreed with the customer."
        assert flag.resolved_by == "admin" and not account.anomaly_hold
        assert period_current(account=account_for_user(user_id=user.pk)).cap == 100_000
        consume(user, 1_000)  # overage allowed again
    assert AuditLog.objects.filter(action="anomaly_resolve", result="hold_lifted", user=user).exists()
