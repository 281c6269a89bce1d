"""Threshold and overage alerts: recorded in the transaction that crossed them,
e-mailed after its commit (tasks eager), exactly once per threshold per period."""
from __future__ import annotations

from datetime import datetime, timezone as dt_timezone

import pytest
import time_machine
from django.core import mail
from django.db import transaction

from alerts.models import AlertEvent
from alerts.services import alert_crossings, alert_crossings_record
from metering.models import UsagePeriod
from metering.services import (ConsumeRequest, RequestContext, account_for_user, period_current, usage_adjust,
                               usage_consume_batch)

from .conftest import html_of, outbox_for

pytestmark = pytest.mark.django_db
NOW = datetime(2026, 11, 10, 12, 0, tzinfo=dt_timezone.utc)


@pytest.fixture(autouse=True)
def frozen():
    with time_machine.travel(NOW, tick=False):
        yield


def test_crossing_arithmetic():
    assert alert_crossings(limit=10_000, used_before=7_400, used=7_500, thresholds=[75, 90, 100]) == ([75], False)
    assert alert_crossings(limit=10_000, used_before=7_500, used=8_000, thresholds=[75, 90, 100]) == ([], False)
    assert alert_crossings(limit=10_000, used_before=0, used=10_001, thresholds=[75, 90, 100]) == ([75, 90, 100], True)
    assert alert_crossings(limit=10_000, used_before=10_000, used=10_001, thresholds=[75, 90, 100]) == ([], True)
    assert alert_crossings(limit=0, used_before=0, used=50, thresholds=[75]) == ([], False)
    # usage going down (a grant) crosses nothing
    assert alert_crossings(limit=100, used_before=95, used=50, thresholds=[75, 90]) == ([], False)


def test_each_threshold_mails_once_then_overage_notice(consume, make_user, on_commit):
    user = make_user("basic")  # limit 10,000, cap 15,000, $0.001/token
    on_commit(consume, user, 7_400)
    assert mail.outbox == []

    on_commit(consume, user, 100)  # 7,500 = 75%
    [m75] = outbox_for(user.email)
    assert m75.subject == "You have used 75% of your tokens this period"
    assert "7,500 of 10,000 tokens (75%)" in m75.body
    assert "http://127.0.0.1:8000/dashboard/" in m75.body and "/alerts/unsubscribe/" in m75.body
    assert "because usage alert e-mails are on" in m75.body
    assert "7,500" in html_of(m75) and 'href="http://127.0.0.1:8000/dashboard/"' in html_of(m75)
    assert m75.extra_headers["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"

    on_commit(consume, user, 1_000)  # 8,500: nothing new
    assert len(mail.outbox) == 1
    on_commit(consume, user, 500)  # 9,000 = 90%
    assert mail.outbox[-1].subject == "You have used 90% of your tokens this period"
    on_commit(consume, user, 1_000)  # 10,000 = 100%, not yet past the limit
    assert mail.outbox[-1].subject == "You have used all 10,000 included tokens this period"
    assert "billed as overage at $0.001 per token, up to 15,000 tokens" in mail.outbox[-1].body
    assert len(mail.outbox) == 3

    on_commit(consume, user, 1_234)  # into overage: the billing notice
    overage = mail.outbox[-1]
    assert overage.subject == "Overage: 1,234 tokens past your limit, $1.234 so far"
    assert "Overage charge:  $1.234" in overage.body and "List-Unsubscribe" not in overage.extra_headers
    assert "billing notice" in overage.body
    on_commit(consume, user, 100)
    assert len(mail.outbox) == 4

    events = AlertEvent.objects.filter(account__user=user).order_by("created_at", "id")
    assert [(e.kind, e.threshold, e.status) for e in events] == [
        ("threshold", 75, "sent"), ("threshold", 90, "sent"), ("threshold", 100, "sent"), ("overage", 0, "sent")]
    assert all(e.sent_at == NOW and e.recipient == user.email for e in events)
    assert events[1].context["used"] == 9_000 and events[1].context["usedBefore"] == 8_500
    assert events[3].context["overageCharge"] == "1.234000"


def test_one_consume_crossing_several_thresholds_sends_the_one_that_says_most(consume, make_user, on_commit):
    user, other = make_user("basic"), make_user("basic")
    on_commit(consume, user, 9_500)
    assert [m.subject for m in mail.outbox] == ["You have used 90% of your tokens this period"]
    events = {e.threshold: e for e in AlertEvent.objects.filter(account__user=user)}
    assert events[75].status == "skipped" and events[75].last_error == "superseded by the 90% alert"
    on_commit(consume, user, 100)  # 75% is not sent later either
    assert len(mail.outbox) == 1

    on_commit(consume, other, 10_500)  # 75, 90 and 100% and into overage at once: the billing notice
    assert [m.subject for m in outbox_for(other.email)] == ["Overage: 500 tokens past your limit, $0.50 so far"]
    assert sorted((e.kind, e.threshold, e.status) for e in AlertEvent.objects.filter(account__user=other)) == [
        ("overage", 0, "sent"), ("threshold", 75, "skipped"), ("threshold", 90, "skipped"),
        ("threshold", 100, "skipped")]


def test_recorded_in_the_crossing_transaction_and_rolled_back_with_it(make_user):
    user = make_user("basic")
    account = account_for_user(user_id=user.pk)
    with pytest.raises(RuntimeError):
        with transaction.atomic():
            usage_adjust(account=account, tokens=8_000, reason="migration from old system", actor="staff")
            assert AlertEvent.objects.filter(account=account, threshold=75).exists()
            raise RuntimeError("the consume failed after the update")
    assert not AlertEvent.objects.exists() and mail.outbox == []


def test_staff_adjustment_and_batch_consume_cross_thresholds(make_user, on_commit, service_key):
    alice, bob = make_user("basic"), make_user("pro")  # 10,000 and 50,000
    on_commit(usage_adjust, account=account_for_user(user_id=alice.pk), tokens=7_600, reason="import",
              actor="staff")
    assert [m.subject for m in outbox_for(alice.email)] == ["You have used 75% of your tokens this period"]

    requests = [ConsumeRequest(user_id=u.pk, operation_id=f"b-{u.pk}-{i}", tokens=t, operation_type="analysis")
                for i, (u, t) in enumerate([(alice, 1_000), (bob, 40_000), (alice, 500), (bob, 5_000)])]
    on_commit(usage_consume_batch, requests=requests, ctx=RequestContext(actor="batch"))
    assert [m.subject for m in outbox_for(alice.email)][1:] == ["You have used 90% of your tokens this period"]
    # bob's two items land in one update (45,000 = 90%): one e-mail, the 90% one
    assert [m.subject for m in outbox_for(bob.email)] == ["You have used 90% of your tokens this period"]
    assert "45,000 of 50,000" in outbox_for(bob.email)[0].body


def test_replay_and_regrowth_after_a_grant_do_not_repeat(consume, make_user, on_commit, api):
    user = make_user("basic")
    body = {"userId": user.pk, "operationId": "same", "tokens": 8_000, "operationType": "summary"}
    on_commit(api.post, "/api/tokens/consume", body, format="json")
    on_commit(api.post, "/api/tokens/consume", body, format="json")  # replay
    assert len(mail.outbox) == 1
    from metering.services import usage_grant

    usage_grant(account=account_for_user(user_id=user.pk), tokens=3_000, reason="goodwill", actor="staff")
    on_commit(consume, user, 3_000)  # back across 75% in the same period
    assert len(mail.outbox) == 1
    assert AlertEvent.objects.filter(account__user=user).count() == 1


def test_no_query_when_nothing_is_crossed(make_user, django_assert_num_queries):
    user = make_user("basic")
    period = UsagePeriod(pk=1, account_id=account_for_user(user_id=user.pk).pk, used=5_000, token_limit=10_000,
                         cap=15_000, reserved=0, overage_rate="0.001", starts_at=NOW, ends_at=NOW)
    with django_assert_num_queries(0):
        assert alert_crossings_record(period=period, used_before=4_000) == []


def test_user_without_address_is_recorded_but_skipped(consume, make_user, on_commit):
    user = make_user("basic")
    type(user).objects.filter(pk=user.pk).update(email="")
    on_commit(consume, user, 8_000)
    event = AlertEvent.objects.get(account__user=user)
    assert event.status == "skipped" and "no e-mail address" in event.last_error and mail.outbox == []


def test_alerts_thresholds_reach_metering_through_its_registration_hook(make_user, settings):
    """Metering's one-statement consume leaves a crossing of an alert threshold to the ORM path
    (which records the alert in its transaction); alerts tells it which, not metering's reading
    of alerts' settings."""
    from metering.services.consume.postgres import consume_fast
    from metering.thresholds import usage_thresholds

    assert usage_thresholds() == [75, 90, 100]
    user = make_user("basic")  # limit 10,000
    period_current(account=account_for_user(user_id=user.pk))  # the statement updates an existing period

    def fast(op: str, tokens: int):
        return consume_fast(request=ConsumeRequest(user_id=user.pk, operation_id=op, tokens=tokens,
                                                   operation_type="summary"), ctx=RequestContext(actor="test"))

    assert fast("below", 6_000) is not None  # 60%: crosses nothing, recorded in one statement
    assert fast("to-75", 1_500) is None  # 75%: left to the ORM path
    settings.ALERT_THRESHOLDS = [80]
    assert usage_thresholds() == [80]
    assert fast("to-75-again", 1_500) is not None  # 75% matters no more
    assert fast("to-80", 500) is None
