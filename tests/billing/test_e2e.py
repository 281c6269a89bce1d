"""The whole story through real HTTP: the app calls the fake Stripe server, and
Stripe's signed webhooks come back into the app's dj-stripe endpoint."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone as dt_timezone
from io import StringIO

import time_machine
from django.core.management import call_command
from django.utils import timezone

from billing.models import BillingAccount, OverageInvoice, TierPrice
from billing.tasks import billing_holds_apply_task, overage_bill_ended_periods_task
from metering.models import Account, UsagePeriod

from .conftest import consume, deliver_all, e2e, subscribe

CREATE_PATHS = r"/v1/(products|prices|customers|checkout/sessions|billing_portal/sessions|invoiceitems|invoices|" \
               r"webhook_endpoints)"


def _ts(value: int) -> datetime:
    return datetime.fromtimestamp(value, tz=dt_timezone.utc)


def _periods(user):
    return list(UsagePeriod.objects.filter(account__user=user).order_by("starts_at"))


@e2e
def test_setup_stripe_twice_second_run_creates_nothing(settings, live_server, stripe_on):
    fake = stripe_on
    settings.SITE_URL = live_server.url
    first = StringIO()
    call_command("setup_stripe", stdout=first)
    assert "CREATED product ct_tier_pro" in first.getvalue()
    assert "CREATED price pro_monthly" in first.getvalue() and "CREATED price pro_yearly" in first.getvalue()
    assert "CREATED webhook endpoint" in first.getvalue()
    creates = len(fake.calls_to("POST", CREATE_PATHS))

    second = StringIO()
    call_command("setup_stripe", stdout=second)
    assert "CREATED" not in second.getvalue()
    assert "0 created" in second.getvalue()
    assert len(fake.calls_to("POST", CREATE_PATHS)) == creates  # not even a replayed create
    assert len(fake.all("product")) == 3 and len(fake.all("price")) == 6 and len(fake.all("webhook_endpoint")) == 1
    assert TierPrice.objects.filter(active=True).count() == 6
    pro_monthly = TierPrice.objects.get(lookup_key="pro_monthly")
    assert pro_monthly.unit_amount_cents == 4900 and fake.get("price", pro_monthly.stripe_price_id)["unit_amount"] == 4900
    endpoint = fake.all("webhook_endpoint")[0]
    assert endpoint["url"].startswith(live_server.url + "/stripe/webhook/")
    assert sorted(endpoint["enabled_events"]) == sorted([
        "customer.subscription.created", "customer.subscription.updated", "customer.subscription.deleted",
        "invoice.payment_succeeded", "invoice.payment_failed", "invoice.upcoming", "customer.updated"])
    for call in fake.calls_to("POST", CREATE_PATHS):
        assert call.idempotency_key and call.idempotency_key.startswith("ct-"), call


@e2e
def test_setup_stripe_follows_a_price_change_by_staff(site, settings):
    from metering.models import Tier

    fake = site
    old = TierPrice.objects.get(lookup_key="pro_monthly")
    Tier.objects.filter(slug="pro").update(monthly_price_cents=5900)
    out = StringIO()
    call_command("setup_stripe", stdout=out)
    assert "CREATED price pro_monthly" in out.getvalue()
    new = TierPrice.objects.get(lookup_key="pro_monthly", active=True)
    assert new.stripe_price_id != old.stripe_price_id and new.unit_amount_cents == 5900
    assert fake.get("price", new.stripe_price_id)["lookup_key"] == "pro_monthly"  # the key moved
    assert fake.get("price", old.stripe_price_id)["active"] is False
    # Subscribers on the old price still map to pro.
    assert TierPrice.objects.get(stripe_price_id=old.stripe_price_id).tier.slug == "pro"


@e2e
def test_subscribe_use_overage_period_end_fail_grace_pay(site, client, make_user, api):
    fake = site
    again = StringIO()
    call_command("setup_stripe", stdout=again)  # the second run (the `site` fixture ran the first)
    assert "0 created" in again.getvalue() and len(fake.all("price")) == 6
    user = make_user("basic")
    basic_period = _periods(user)  # may be empty: opened lazily
    sub_id = subscribe(fake, client, user, "pro")

    # The webhook made the account pro, with Stripe's period.
    account = Account.objects.select_related("tier").get(user=user)
    item = fake.get("subscription", sub_id)["items"]["data"][0]
    assert account.tier.slug == "pro" and account.status == "active"
    period = UsagePeriod.objects.get(account=account, starts_at=_ts(item["current_period_start"]))
    assert period.ends_at == _ts(item["current_period_end"])
    assert (period.token_limit, period.cap, period.used) == (50_000, 100_000, 0)
    assert basic_period == [] or _periods(user)[0].ends_at == period.starts_at
    checkout = fake.calls_to("POST", r"/v1/checkout/sessions")
    assert len(checkout) == 1 and checkout[0].idempotency_key.startswith("ct-checkout-")

    # Usage past the limit, through the real consume API. Rounded per request these
    # would be 25 + 25 + 75 = 125 cents; rounded once for the period, 1,235 tokens x $0.001
    # = 123.5 cents -> 124.
    for i, tokens in enumerate([50_000, 245, 245, 745]):
        assert consume(api, user, tokens, f"op-{i}").status_code == 201
    assert consume(api, user, 245, "op-1").status_code == 200  # a replay charges nothing

    # Stripe announces the upcoming invoice (twice): the overage goes on it as one item.
    upcoming = fake.upcoming_invoice_event(sub_id)
    deliver_all(fake, [upcoming, upcoming])
    deliver_all(fake, [fake.upcoming_invoice_event(sub_id)])
    items = fake.all("invoiceitem")
    assert len(items) == 1 and items[0]["amount"] == 124 and items[0]["currency"] == "usd"
    overage = OverageInvoice.objects.get()
    assert (overage.tokens, overage.amount_cents, overage.state) == (1235, 124, "created")
    assert overage.stripe_invoice_item_id == items[0]["id"]
    assert overage.idempotency_key == f"ct-overage-{period.pk}-1235"

    # The period ends; the renewal invoice (with the overage item) fails to charge.
    events = fake.subscription_renew(sub_id, pay=False)
    deliver_all(fake, events)
    deliver_all(fake, events)  # delivered twice: nothing changes
    overage_bill_ended_periods_task.delay()
    overage_bill_ended_periods_task.delay()
    assert len(fake.all("invoiceitem")) == 1
    renewal = events[1]["data"]["object"]
    assert renewal["amount_due"] == 4900 + 124
    account.refresh_from_db()
    new_period = _periods(user)[-1]
    assert new_period.starts_at > period.starts_at and new_period.used == 0
    period.refresh_from_db()
    assert period.used == 51_235 and period.ends_at == new_period.starts_at  # history stays
    assert account.status == "past_due" and account.billing_hold is False
    assert OverageInvoice.objects.get().state == "failed"
    # Within the grace period the overage allowance stays.
    billing_holds_apply_task.delay()
    new_period.refresh_from_db()
    assert new_period.cap == 100_000

    # After the grace period: included tokens only.
    with time_machine.travel(timezone.now() + timedelta(days=3, minutes=1), tick=True):
        billing_holds_apply_task.delay()
    account.refresh_from_db()
    new_period.refresh_from_db()
    assert account.billing_hold is True and (new_period.token_limit, new_period.cap) == (50_000, 50_000)
    assert consume(api, user, 50_000, "after-hold-1").status_code == 201
    refused = consume(api, user, 1, "after-hold-2")
    assert refused.status_code == 402 and refused.json()["error"]["code"] == "token_cap_exceeded"

    # Stripe retries the invoice and it succeeds: back to normal.
    deliver_all(fake, fake.invoice_pay(renewal["id"]))
    account.refresh_from_db()
    new_period.refresh_from_db()
    billing = BillingAccount.objects.get(account=account)
    assert account.status == "active" and account.billing_hold is False and billing.payment_failed_at is None
    assert new_period.cap == 100_000
    assert OverageInvoice.objects.get().state == "paid"
    assert OverageInvoice.objects.get().stripe_invoice_id == renewal["id"]
    assert consume(api, user, 1, "after-pay").status_code == 201

    # Every create call we made to Stripe carried our idempotency key.
    for call in fake.calls_to("POST", CREATE_PATHS):
        assert call.idempotency_key and call.idempotency_key.startswith("ct-"), call
