"""Stripe's webhooks into the app: signatures, duplicates, order, plan changes,
cancellation, and a failed webhook retried from admin."""
from __future__ import annotations

import json
import logging
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import time_machine
from django.utils import timezone
from djstripe.models import Event, WebhookEventTrigger

from billing.models import BillingAccount, OverageInvoice
from billing.tasks import overage_bill_ended_periods_task, subscriptions_expire_task
from metering.models import Account, UsagePeriod

from .conftest import checkout, consume, deliver_all, e2e, price_id, subscribe


def _account(user):
    return Account.objects.select_related("tier").get(user=user)


def _current(user):
    return UsagePeriod.objects.filter(account__user=user).order_by("-starts_at").first()


@e2e
def test_bad_signature_is_refused_and_changes_nothing(site, client, make_user):
    fake = site
    user = make_user("basic")
    created, paid = checkout(fake, client, user, "pro")

    status, _ = fake.deliver(created, secret="whsec_not_the_endpoint_secret")
    assert status == 400
    payload = json.dumps(created)
    tampered = {**created, "data": {"object": {**created["data"]["object"], "status": "canceled"}}}
    status, _ = fake.deliver(tampered, signature=fake.sign(payload, next(iter(fake.webhook_secrets.values()))))
    assert status == 400  # signed body != delivered body
    assert _account(user).tier.slug == "basic"
    assert not Event.objects.filter(id=created["id"]).exists()
    assert WebhookEventTrigger.objects.filter(valid=False).count() == 2
    assert not BillingAccount.objects.filter(account__user=user, stripe_subscription_id__gt="").exists()

    deliver_all(fake, [created, paid])  # the genuine delivery still works
    assert _account(user).tier.slug == "pro"


@e2e
def test_unknown_price_is_logged_and_the_account_left_as_it_was(site, client, make_user, caplog):
    fake = site
    user = make_user("basic")
    sub_id = subscribe(fake, client, user, "pro")
    before = _current(user)
    stray = fake.handle("POST", "/v1/prices", {"product": "ct_tier_pro", "unit_amount": "777", "currency": "usd",
                                              "recurring": {"interval": "month"}},
                        idempotency_key=None, authorization=f"Bearer {fake.secret_key}")[1]
    with caplog.at_level(logging.ERROR, logger="billing.services"):
        deliver_all(fake, fake.subscription_change_price(sub_id, stray["id"]))
    assert any(stray["id"] in r.getMessage() and "no tier" in r.getMessage() for r in caplog.records)
    account = _account(user)
    assert account.tier.slug == "pro" and account.status == "active"
    after = _current(user)
    assert (after.pk, after.token_limit, after.cap) == (before.pk, before.token_limit, before.cap)


@e2e
def test_out_of_order_events_never_let_older_state_win(site, client, make_user):
    fake = site
    user = make_user("basic")
    created, paid = checkout(fake, client, user, "pro")
    sub_id = created["data"]["object"]["id"]
    (upgraded,) = fake.subscription_change_price(sub_id, price_id(fake, "enterprise_monthly"))
    renewed, renewal_paid = fake.subscription_renew(sub_id)

    # Newest first, then the older ones (and a duplicate).
    deliver_all(fake, [renewed, renewal_paid, upgraded, created, paid, upgraded])
    account = _account(user)
    item = fake.get("subscription", sub_id)["items"]["data"][0]
    assert account.tier.slug == "enterprise"
    period = _current(user)
    assert int(period.starts_at.timestamp()) == item["current_period_start"]
    assert period.token_limit == 200_000
    billing = BillingAccount.objects.get(account=account)
    assert int(billing.current_period_start.timestamp()) == item["current_period_start"]


@e2e
def test_upgrade_applies_at_once_downgrade_at_next_period(site, client, make_user, api):
    fake = site
    user = make_user("basic")
    sub_id = subscribe(fake, client, user, "pro")
    assert consume(api, user, 12_000, "u-1").status_code == 201
    period = _current(user)

    deliver_all(fake, fake.subscription_change_price(sub_id, price_id(fake, "enterprise_monthly")))
    now_period = _current(user)
    assert now_period.pk == period.pk and now_period.used == 12_000
    assert (now_period.token_limit, now_period.cap) == (200_000, 600_000)  # upgrade: at once
    assert _account(user).tier.slug == "enterprise"

    deliver_all(fake, fake.subscription_change_price(sub_id, price_id(fake, "basic_monthly")))
    billing = BillingAccount.objects.select_related("pending_tier").get(account__user=user)
    assert _account(user).tier.slug == "enterprise" and billing.pending_tier.slug == "basic"
    assert _current(user).token_limit == 200_000  # downgrade: not yet

    deliver_all(fake, fake.subscription_renew(sub_id))
    new_period = _current(user)
    assert new_period.pk != period.pk and new_period.used == 0
    assert (new_period.token_limit, new_period.cap) == (10_000, 15_000)
    assert _account(user).tier.slug == "basic"
    billing.refresh_from_db()
    assert billing.pending_tier is None
    period.refresh_from_db()
    assert period.token_limit == 200_000 and period.used == 12_000  # history keeps its terms


@e2e
def test_period_end_bills_overage_once_however_often_webhooks_and_jobs_run(site, client, make_user, api):
    fake = site
    user = make_user("basic")
    sub_id = subscribe(fake, client, user, "enterprise")
    period = _current(user)
    assert consume(api, user, 200_000, "e-1").status_code == 201
    assert consume(api, user, 3_333, "e-2").status_code == 201  # 3,333 x $0.0008 = $2.6664 -> 267 cents

    renewed, paid = fake.subscription_renew(sub_id)
    deliver_all(fake, [renewed, renewed, paid])
    overage_bill_ended_periods_task.delay()
    overage_bill_ended_periods_task.delay()
    items = fake.all("invoiceitem")
    assert len(items) == 1
    item = items[0]
    assert item["amount"] == 267 and item["customer"] == BillingAccount.objects.get(account__user=user).stripe_customer_id
    assert item["period"] == {"start": int(period.starts_at.timestamp()), "end": int(renewed["data"]["object"]
                              ["items"]["data"][0]["current_period_start"])}
    row = OverageInvoice.objects.get()
    assert (row.period_id, row.tokens, str(row.rate), row.amount_cents, row.state) == (period.pk, 3333, "0.000800",
                                                                                       267, "created")
    posts = fake.calls_to("POST", r"/v1/invoiceitems")
    assert {c.idempotency_key for c in posts} == {f"ct-overage-{period.pk}-3333"}
    # The next renewal invoice carries it, and paying that marks it paid.
    deliver_all(fake, fake.subscription_renew(sub_id))
    row.refresh_from_db()
    assert row.state == "paid" and row.stripe_invoice_id


@e2e
def test_canceled_subscription_keeps_access_until_the_paid_end_then_none(site, settings, client, make_user, api):
    settings.DEFAULT_TIER = None  # the policy for accounts nobody pays for: no tier
    fake = site
    user = make_user("basic")
    sub_id = subscribe(fake, client, user, "pro")
    paid_end = fake.get("subscription", sub_id)["items"]["data"][0]["current_period_end"]
    deliver_all(fake, fake.subscription_cancel(sub_id))
    account = _account(user)
    assert account.status == "canceled" and account.tier.slug == "pro"  # paid until the period ends
    assert consume(api, user, 1_000, "c-1").status_code == 201

    assert consume(api, user, 51_000, "c-2").status_code == 201  # 2,000 overage tokens in the paid period

    with time_machine.travel(timezone.now() + timedelta(days=10, hours=1), tick=True):
        assert int(timezone.now().timestamp()) > paid_end
        subscriptions_expire_task.delay()
        subscriptions_expire_task.delay()
        account = _account(user)
        assert account.tier is None
        # The paid period's overage is billed, and invoiced at once (no renewal will carry it).
        (item,) = fake.all("invoiceitem")
        assert item["amount"] == 200 and item["invoice"]
        assert OverageInvoice.objects.get().stripe_invoice_id == item["invoice"]
        refused = consume(api, user, 1, "c-3")
        assert refused.status_code == 402
        period = _current(user)
        assert int(period.starts_at.timestamp()) == paid_end and (period.token_limit, period.cap) == (0, 0)


@e2e
def test_canceled_subscription_falls_back_to_the_default_tier(site, settings, client, make_user, api):
    settings.DEFAULT_TIER = "basic"
    fake = site
    user = make_user(None)
    sub_id = subscribe(fake, client, user, "pro")
    deliver_all(fake, fake.subscription_cancel(sub_id))
    with time_machine.travel(timezone.now() + timedelta(days=10, hours=1), tick=True):
        subscriptions_expire_task.delay()
        assert _account(user).tier.slug == "basic"
        assert consume(api, user, 10_000, "d-1").status_code == 201
        assert _current(user).token_limit == 10_000


@e2e
def test_a_failed_first_payment_grants_nothing(site, client, make_user):
    fake = site
    user = make_user("basic")
    deliver_all(fake, checkout(fake, client, user, "pro", pay=False))
    account = _account(user)
    assert account.tier.slug == "basic" and account.status == "active" and not account.billing_hold
    billing = BillingAccount.objects.get(account=account)
    assert billing.subscription_status == "incomplete" and billing.payment_failed_at is None


@e2e
def test_a_failed_webhook_is_kept_and_staff_retry_it_from_admin(site, client, make_user, admin_client):
    fake = site
    user = make_user("basic")
    sub_id = subscribe(fake, client, user, "pro")
    (event,) = fake.subscription_change_price(sub_id, price_id(fake, "enterprise_monthly"))
    # Stripe is down while dj-stripe re-fetches the subscription (every retry too).
    fake.fail_next = [("GET", r"/v1/subscriptions/.+", 503)] * 5
    status, _ = fake.deliver(event)
    fake.fail_next = []
    assert status == 500
    trigger = WebhookEventTrigger.objects.get(event__isnull=True, valid=True, processed=False)
    assert trigger.exception and "Traceback" in trigger.traceback
    assert _account(user).tier.slug == "pro"
    assert not Event.objects.filter(id=event["id"]).exists()  # rolled back, so it can be processed again

    response = admin_client.post("/admin/djstripe/webhookeventtrigger/",
                                 {"action": "retry", "_selected_action": [trigger.pk]})
    assert response.status_code == 302
    trigger.refresh_from_db()
    assert trigger.processed and trigger.event_id == event["id"]
    assert _account(user).tier.slug == "enterprise"


@e2e
def test_concurrent_deliveries_apply_once(site, client, make_user, api):
    """Stripe delivers the renewal's events at once, and each of them twice."""
    fake = site
    user = make_user("basic")
    sub_id = subscribe(fake, client, user, "pro")
    assert consume(api, user, 50_500, "k-1").status_code == 201
    old = _current(user)
    events = fake.subscription_renew(sub_id) * 3
    with ThreadPoolExecutor(max_workers=len(events)) as pool:
        results = list(pool.map(fake.deliver, events))
    assert all(status == 200 for status, _ in results), results
    periods = list(UsagePeriod.objects.filter(account__user=user).order_by("starts_at"))
    assert periods[-2].pk == old.pk and periods[-1].used == 0
    assert len([p for p in periods if p.starts_at > old.starts_at]) == 1
    assert [i["amount"] for i in fake.all("invoiceitem")] == [50]
    assert OverageInvoice.objects.count() == 1
    assert _account(user).status == "active"


@e2e
def test_a_customer_made_outside_the_app_is_linked_through_its_metadata(site, make_user):
    """Staff created the customer and subscription in Stripe's dashboard; dj-stripe links
    the customer to the user (metadata djstripe_subscriber) and the account follows."""
    fake = site
    user = make_user("basic")
    auth = f"Bearer {fake.secret_key}"
    _, customer = fake.handle("POST", "/v1/customers", {"email": user.email, "metadata": {
        "djstripe_subscriber": str(user.pk)}}, idempotency_key=None, authorization=auth)
    _, session = fake.handle("POST", "/v1/checkout/sessions", {
        "mode": "subscription", "customer": customer["id"], "success_url": "https://example.com/ok",
        "line_items": [{"price": price_id(fake, "enterprise_monthly"), "quantity": "1"}]},
        idempotency_key=None, authorization=auth)
    deliver_all(fake, fake.checkout_complete(session["id"]))
    assert _account(user).tier.slug == "enterprise"
    assert BillingAccount.objects.get(account__user=user).stripe_customer_id == customer["id"]


@e2e
def test_a_subscription_of_an_unknown_customer_changes_nothing(site, make_user, caplog):
    fake = site
    user = make_user("basic")
    auth = f"Bearer {fake.secret_key}"
    _, customer = fake.handle("POST", "/v1/customers", {"email": "stranger@example.com"}, idempotency_key=None,
                              authorization=auth)
    _, session = fake.handle("POST", "/v1/checkout/sessions", {
        "mode": "subscription", "customer": customer["id"], "success_url": "https://example.com/ok",
        "line_items": [{"price": price_id(fake, "pro_monthly"), "quantity": "1"}]},
        idempotency_key=None, authorization=auth)
    with caplog.at_level(logging.WARNING, logger="billing.services"):
        deliver_all(fake, fake.checkout_complete(session["id"]))
    assert any("belongs to no account" in r.getMessage() for r in caplog.records)
    assert _account(user).tier.slug == "basic" and not BillingAccount.objects.exists()


@e2e
def test_an_older_invoice_paid_late_does_not_lift_a_newer_failure(site, client, make_user):
    fake = site
    user = make_user("basic")
    sub_id = subscribe(fake, client, user, "pro")
    first_invoice = fake.get("subscription", sub_id)["latest_invoice"]
    first_paid = next(e for e in fake.all("event") if e["type"] == "invoice.payment_succeeded")
    deliver_all(fake, fake.subscription_renew(sub_id, pay=False))
    assert _account(user).status == "past_due"
    # Stripe redelivers the first invoice's (old) success event under a new id.
    late = fake.event("invoice.payment_succeeded", fake.get("invoice", first_invoice),
                      created=first_paid["created"])
    deliver_all(fake, [late])
    account = _account(user)
    assert account.status == "past_due"
    assert BillingAccount.objects.get(account=account).payment_failed_at is not None
