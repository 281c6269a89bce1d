"""The support console in Django admin: a "support" staff user does the issue's
support work through services, and every change lands in the audit log."""
from __future__ import annotations

import re
from datetime import timedelta
from decimal import Decimal

import pytest
from django.core.management import call_command
from django.test import Client
from django.utils import timezone

from billing.models import PlanChange, TierComp
from metering.models import Account, AuditLog, LedgerEntry, OperationType, Reservation, ServiceKey, Tier
from metering.services import SYSTEM, ledger_reconcile, usage_check


@pytest.fixture
def support(db, django_user_model):
    call_command("setup_support_group")
    from django.contrib.auth.models import Group

    user = django_user_model.objects.create_user("sam", "sam@example.com", "pw-for-tests-1", is_staff=True)
    user.groups.add(Group.objects.get(name="support"))
    client = Client()
    client.force_login(user)
    return client


@pytest.fixture
def superuser(db, django_user_model):
    user = django_user_model.objects.create_superuser("root", "root@example.com", "pw-for-tests-1")
    client = Client()
    client.force_login(user)
    return client


def _support_url(user, action):
    return f"/admin/metering/account/{user.token_account.pk}/support/{action}/"


@pytest.mark.django_db
def test_account_list_shows_usage_and_searches_by_email_and_filters_flagged(support, make_user, consume):
    alice, bob = make_user("basic", username="alice"), make_user("pro", username="bob")
    consume(alice, 9_500)
    bob.token_account.anomaly_hold = True
    bob.token_account.save()
    page = support.get("/admin/metering/account/").content.decode()
    assert "95%" in page and "status-critical" in page
    found = support.get("/admin/metering/account/?q=alice@example.com").content.decode()
    assert "alice" in found and ">bob<" not in found
    flagged = support.get("/admin/metering/account/?flagged=yes").content.decode()
    assert "bob" in flagged and "alice@example.com" not in flagged
    assert "anomaly hold" in flagged


@pytest.mark.django_db
def test_a_tier_change_without_a_subscription_is_refused_it_can_only_be_a_comp(support, make_user):
    user = make_user("basic")
    page = support.get(f"/admin/metering/account/{user.token_account.pk}/change/").content.decode()
    assert 'data-support-action="comp"' in page and 'data-support-action="change-plan"' not in page
    asked = support.get(_support_url(user, "change-plan")).content.decode()
    assert 'data-field="refusal"' in asked and "a tier change can only be a comp" in asked
    pro = Tier.objects.get(slug="pro")
    for form in ({"tier": pro.pk, "reason": "upsell call"}, {"tier": pro.pk, "reason": "upsell call", "_confirm": "1"}):
        refused = support.post(_support_url(user, "change-plan"), form)
        assert refused.status_code == 200 and b"can only be a comp" in refused.content
    user.token_account.refresh_from_db()
    assert user.token_account.tier.slug == "basic"
    assert not PlanChange.objects.exists()
    assert not AuditLog.objects.filter(user=user, action__in=["plan_change", "comp_grant", "change_tier"]).exists()


@pytest.mark.django_db
def test_a_comp_is_confirmed_before_it_is_granted_shown_then_ended(support, make_user, settings):
    settings.DEFAULT_TIER = "basic"
    user = make_user("basic")
    enterprise = Tier.objects.get(slug="enterprise")
    last_day = (timezone.now() + timedelta(days=40)).date()
    form = {"tier": enterprise.pk, "last_day": last_day.isoformat(), "reason": "conference speaker"}
    assert support.post(_support_url(user, "comp"), {**form, "reason": " "}).status_code == 200  # a reason is required
    asked = support.post(_support_url(user, "comp"), form)
    text = asked.content.decode()
    ends = (last_day + timedelta(days=1)).isoformat()
    assert asked.status_code == 200 and 'name="_confirm"' in text
    assert (f"Enterprise is granted without billing until {ends} 00:00 UTC (reason: conference speaker); "
            f"Stripe is not changed; at the end the account returns to Basic") in text
    assert not TierComp.objects.exists() and Account.objects.get(user=user).tier.slug == "basic"  # not yet

    done = support.post(_support_url(user, "comp"), {**form, "_confirm": "Confirm"})
    assert done.status_code == 302
    assert Account.objects.get(user=user).tier == enterprise
    client = Client()
    client.force_login(user)
    assert client.get("/api/tokens/usage").json()["limit"] == 200_000
    row = AuditLog.objects.get(user=user, action="comp_grant")
    assert row.actor == "sam" and row.detail["reason"] == "conference speaker" and row.detail["to"] == "enterprise"
    page = support.get(f"/admin/metering/account/{user.token_account.pk}/change/").content.decode()
    assert "granted without billing until" in page and "conference speaker" in page
    assert 'data-support-action="end-comp"' in page
    listed = support.get("/admin/metering/account/").content.decode()
    assert f'<span data-field="comp">Enterprise until {ends} 00:00 UTC (conference speaker)</span>' in listed

    asked = support.post(_support_url(user, "end-comp"), {"reason": "talk canceled"}).content.decode()
    assert "ends now; the account returns to Basic" in asked and "Stripe is not changed" in asked
    assert Account.objects.get(user=user).tier == enterprise  # not yet
    assert support.post(_support_url(user, "end-comp"), {"reason": "talk canceled", "_confirm": "1"}).status_code == 302
    assert Account.objects.get(user=user).tier.slug == "basic"
    comp = TierComp.objects.get()
    assert (comp.ended_by, comp.end_reason) == ("sam", "talk canceled")
    assert AuditLog.objects.filter(user=user, action="comp_end", actor="sam").exists()


@pytest.mark.django_db
def test_grant_and_correct_write_ledger_entries_never_edit_one(support, make_user, consume):
    user = make_user()
    consume(user, 1_000)
    before = list(LedgerEntry.objects.filter(account__user=user).values_list("pk", "used_delta"))
    assert support.post(_support_url(user, "tokens"), {"kind": "grant", "tokens": 300, "reason": ""}).status_code == 200
    assert support.post(_support_url(user, "tokens"), {"kind": "grant", "tokens": 300, "reason": "outage"}).status_code == 302
    assert support.post(_support_url(user, "tokens"), {"kind": "adjust", "tokens": -50, "reason": "double count"}).status_code == 302
    bad = support.post(_support_url(user, "tokens"), {"kind": "adjust", "tokens": -5000, "reason": "too much"})
    assert b"cannot go below zero" in bad.content
    rows = list(LedgerEntry.objects.filter(account__user=user).order_by("pk").values_list("kind", "used_delta", "actor", "reason"))
    assert rows[-2:] == [("grant", -300, "sam", "outage"), ("adjustment", -50, "sam", "double count")]
    assert list(LedgerEntry.objects.filter(pk__in=[p for p, _ in before]).values_list("pk", "used_delta")) == before
    assert ledger_reconcile() == []
    assert AuditLog.objects.filter(user=user, action__in=["grant", "adjustment"], actor="sam").count() == 2


@pytest.mark.django_db
def test_reset_period_and_release_a_stuck_reservation(support, make_user, consume):
    user = make_user()
    consume(user, 2_000)
    held = usage_check(user_id=user.pk, tokens=700, ctx=SYSTEM, reserve=True, operation_id="stuck-1").reservation
    assert support.post(_support_url(user, "reset"), {"reason": "billing mistake"}).status_code == 200  # unconfirmed
    assert support.post(_support_url(user, "reset"), {"reason": "billing mistake", "confirm": "on"}).status_code == 302
    page = support.get(_support_url(user, "release")).content.decode()
    assert "stuck-1" in page
    assert support.post(_support_url(user, "release"), {"reservation": str(held.pk), "reason": "worker died"}).status_code == 302
    held.refresh_from_db()
    assert held.status == Reservation.Status.RELEASED
    client = Client()
    client.force_login(user)
    usage = client.get("/api/tokens/usage").json()
    assert usage["used"] == 0 and usage["reserved"] == 0
    assert AuditLog.objects.filter(user=user, action="support_release", detail__reason="worker died").exists()
    assert AuditLog.objects.filter(user=user, action="reset", actor="sam").exists()
    assert ledger_reconcile() == []


@pytest.mark.django_db
def test_the_console_rounds_the_usage_percentage_down_as_the_api_does(support, api, make_user, consume):
    user = make_user("pro")  # 50,000
    consume(user, 49_999)
    answer = api.get(f"/api/tokens/usage?userId={user.pk}").json()
    assert (answer["usagePercentage"], answer["status"]) == (99.99, "critical")
    listed = support.get("/admin/metering/account/").content.decode()
    assert '<span class="usage-pct status-critical">99.99%</span>' in listed
    page = support.get(f"/admin/metering/account/{user.token_account.pk}/change/").content.decode()
    assert '<span class="usage-pct status-critical">99.99%</span>, critical)' in page


@pytest.mark.django_db
def test_account_page_shows_figures_ledger_and_audit_read_only(support, make_user, consume):
    user = make_user()
    for _ in range(60):
        consume(user, 10)
    page = support.get(f"/admin/metering/account/{user.token_account.pk}/change/").content.decode()
    assert 'data-field="admin-used">600<' in page and 'data-field="admin-limit">10,000<' in page
    assert page.count('<td class="field-operation_id">') == 20  # the latest 20 ledger rows
    assert 'data-table="audit"' in page and 'data-support-action="comp"' in page
    assert 'name="ledger-0-used_delta"' not in page  # read-only, no inputs


@pytest.mark.django_db
def test_support_cannot_touch_service_keys_or_tier_prices_but_a_superuser_can(support, superuser):
    assert support.get("/admin/metering/servicekey/").status_code == 403
    assert support.get("/admin/metering/servicekey/add/").status_code == 403
    assert superuser.get("/admin/metering/servicekey/").status_code == 200
    created = superuser.post("/admin/metering/servicekey/add/", {"name": "backend", "scope": "consume"}, follow=True)
    assert re.search(rb"shown once, store it now\): ct_", created.content)
    basic = Tier.objects.get(slug="basic")
    form = {"name": "Basic plus", "requests_per_hour": 150, "features": '["Email reports"]'}
    assert support.post(f"/admin/metering/tier/{basic.pk}/change/", {**form, "overage_rate": "0.5",
                                                                      "monthly_token_limit": 1}).status_code == 302
    basic.refresh_from_db()
    assert basic.name == "Basic plus" and basic.overage_rate == Decimal("0.001") and basic.monthly_token_limit == 10_000


@pytest.mark.django_db
def test_every_admin_change_lands_in_the_audit_log(support, superuser):
    op = OperationType.objects.get(slug="summary")
    response = support.post(f"/admin/metering/operationtype/{op.pk}/change/",
                            {"slug": "summary", "name": "Summary", "base_tokens": 120, "active": "on"})
    assert response.status_code == 302
    row = AuditLog.objects.get(action="admin_change")
    assert row.actor == "sam" and row.detail["model"] == "metering.operationtype" and "Base tokens" in row.detail["change"]
    key = ServiceKey.objects.create(name="old", prefix="ct_x", hashed_key="0" * 64, environment="test")
    superuser.post("/admin/metering/servicekey/", {"action": "revoke", "_selected_action": [key.pk]})
    assert AuditLog.objects.filter(action="admin_change", actor="root", detail__objectId=str(key.pk)).exists()


@pytest.mark.django_db
def test_landing_page_numbers(support, make_user, consume):
    over = make_user("basic")
    consume(over, 9_200)
    overage = make_user("basic")
    consume(overage, 10_500)  # 500 past the limit at $0.001
    page = support.get("/admin/").content.decode()
    assert re.search(r'data-number="tokens-today">19,700<', page)
    assert re.search(r'data-number="over-90"><a [^>]*>2<', page)
    assert 'data-number="overage">$0.50<' in page
    assert 'data-number="open-flags">' in page and 'data-number="failures">' in page


@pytest.mark.django_db
def test_support_group_command_is_idempotent(db):
    from django.contrib.auth.models import Group

    call_command("setup_support_group")
    call_command("setup_support_group")
    group = Group.objects.get(name="support")
    codenames = set(group.permissions.values_list("codename", flat=True))
    assert {"change_account", "view_ledgerentry", "change_anomalyflag", "change_overageinvoice"} <= codenames
    assert not {c for c in codenames if "servicekey" in c} and "delete_account" not in codenames


@pytest.mark.django_db
def test_resend_a_failed_alert_from_the_account_page(support, make_user, consume,
                                                     django_capture_on_commit_callbacks):
    from django.core import mail

    from alerts.models import AlertEvent

    user = make_user("basic")
    consume(user, 8_000)  # crosses 75%: an alert is recorded (and sent, eagerly)
    event = AlertEvent.objects.get(account__user=user)
    AlertEvent.objects.filter(pk=event.pk).update(status="failed", attempts=8, last_error="SMTP down")
    sent_before = len(mail.outbox)
    page = support.get(_support_url(user, "resend-alert")).content.decode()
    assert f'value="{event.pk}"' in page and "Failed" in page
    assert support.post(_support_url(user, "resend-alert"), {"alert": event.pk, "reason": ""}).status_code == 200
    with django_capture_on_commit_callbacks(execute=True):  # the queued send runs (eagerly) after commit
        done = support.post(_support_url(user, "resend-alert"), {"alert": event.pk, "reason": "customer asked"})
    assert done.status_code == 302
    event.refresh_from_db()
    assert event.status == "sent" and len(mail.outbox) == sent_before + 1
    assert AuditLog.objects.filter(user=user, action="alert_resend", actor="sam", detail__reason="customer asked").exists()


@pytest.mark.django_db
def test_search_by_stripe_customer_id_and_see_the_stripe_status(support, make_user):
    from billing.models import BillingAccount

    carol = make_user("pro", username="carol")
    make_user("pro", username="dave")
    BillingAccount.objects.create(account=carol.token_account, stripe_customer_id="cus_Q1w2E3r4",
                                  subscription_status="past_due")
    page = support.get("/admin/metering/account/?q=cus_Q1w2E3r4").content.decode()
    assert "carol" in page and "dave" not in page and "past_due" in page
