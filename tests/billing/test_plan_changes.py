"""Support's tier changes: a subscriber's plan changes through Stripe (the price on the
subscription, an idempotency key from a row recorded first, the webhook confirming it,
the renewal keeping it), and a comp is an explicit override that webhooks respect
until it ends on its date."""
from __future__ import annotations

from datetime import timedelta

import psycopg
import pytest
import time_machine
from django.db import DatabaseError, connection
from django.utils import timezone

from billing.models import BillingAccount, PlanChange, TierComp, TierPrice
from billing.services.comps import comp_grant, comp_in_force
from billing.services.plan_changes import plan_change_request
from billing.tasks import comps_expire_task, plan_changes_resume_task
from consensus_tokens.errors import ApplicationError
from metering.models import Account, AuditLog, Tier, UsagePeriod
from metering.services import period_current

from .conftest import consume, deliver_all, e2e, price_id, subscribe

pytestmark = pytest.mark.within_one_period  # live servers and moved clocks: start clear of a month's end


def _account(user):
    return Account.objects.select_related("tier").get(user=user)


def _current(user):
    return UsagePeriod.objects.filter(account__user=user).order_by("-starts_at").first()


def _updates(fake, sub_id):
    return fake.calls_to("POST", rf"/v1/subscriptions/{sub_id}")


@e2e
def test_support_upgrade_reaches_stripe_is_confirmed_and_survives_the_renewal(site, client, make_user, api):
    fake = site
    user = make_user("basic")
    sub_id = subscribe(fake, client, user, "pro")
    item_id = fake.get("subscription", sub_id)["items"]["data"][0]["id"]
    assert consume(api, user, 30_000, "p-1").status_code == 201
    period = _current(user)

    change = plan_change_request(account=_account(user), tier=Tier.objects.get(slug="enterprise"),
                                 reason="upgrade asked on the phone", actor="sam")

    enterprise = price_id(fake, "enterprise_monthly")
    (call,) = _updates(fake, sub_id)
    assert call.idempotency_key == f"ct-plan-change-{change.pk}"
    assert call.params["items"] == [{"id": item_id, "price": enterprise}]
    assert call.params["proration_behavior"] == "always_invoice"
    assert fake.get("subscription", sub_id)["items"]["data"][0]["price"]["id"] == enterprise
    # Stripe invoiced (and charged) the prorated difference at once.
    (proration,) = [i for i in fake.all("invoice") if i["billing_reason"] == "subscription_update"]
    assert proration["status"] == "paid" and proration["amount_paid"] > 0
    assert change.state == "sent" and change.stripe_invoice_id == proration["id"]
    # The account follows the subscription Stripe returned: the upgrade applies at once.
    account = _account(user)
    assert account.tier.slug == "enterprise"
    assert (_current(user).pk, _current(user).token_limit, _current(user).used) == (period.pk, 200_000, 30_000)

    deliver_all(fake, fake.take_events())  # customer.subscription.updated, the proration's payment
    change.refresh_from_db()
    assert change.state == "confirmed" and change.confirmed_at is not None

    # The renewal carries the price Stripe now holds: the change is not undone.
    deliver_all(fake, fake.subscription_renew(sub_id))
    renewed = _current(user)
    assert renewed.pk != period.pk and (renewed.token_limit, renewed.used) == (200_000, 0)
    assert _account(user).tier.slug == "enterprise"
    assert BillingAccount.objects.get(account__user=user).stripe_price_id == enterprise
    renewal = max(fake.all("invoice"), key=lambda i: i["created"] if i["billing_reason"] == "subscription_cycle" else 0)
    assert renewal["billing_reason"] == "subscription_cycle"
    enterprise_cents = TierPrice.objects.get(lookup_key="enterprise_monthly").unit_amount_cents
    assert renewal["lines"]["data"][0]["amount"] == enterprise_cents
    assert list(AuditLog.objects.filter(user=user, action="plan_change").order_by("id").values_list(
        "result", "actor")) == [("requested", "sam"), ("sent", "sam")]


def _kill_backend_when_stripe_answers(fake, path):
    """Our database connection dies the moment Stripe answers the subscription update: a
    crash between Stripe's change and our recording it."""
    with connection.cursor() as cursor:
        cursor.execute("select pg_backend_pid()")
        pid = cursor.fetchone()[0]
    params = connection.get_connection_params()
    dsn = {k: params[k] for k in ("host", "port", "user", "dbname") if params.get(k)}

    def hook(call, status, body):
        if call.method == "POST" and call.path == path and not call.replayed:
            with psycopg.connect(**dsn, autocommit=True) as admin:
                admin.execute("select pg_terminate_backend(%s)", [pid])

    fake.before_answer.append(hook)
    return hook


@e2e
def test_a_crash_after_stripe_answered_is_resumed_with_the_same_key(site, client, make_user):
    fake = site
    user = make_user("basic")
    sub_id = subscribe(fake, client, user, "pro")
    enterprise = Tier.objects.get(slug="enterprise")

    hook = _kill_backend_when_stripe_answers(fake, f"/v1/subscriptions/{sub_id}")
    with pytest.raises(DatabaseError):
        plan_change_request(account=_account(user), tier=enterprise, reason="upsell", actor="sam")
    fake.before_answer.remove(hook)
    connection.close()

    change = PlanChange.objects.get()
    assert change.state == "started"  # Stripe changed the price, we never recorded its answer
    assert _account(user).tier.slug == "pro"
    assert change.stripe_params["items"][0]["price"] == price_id(fake, "enterprise_monthly")

    # Support asks for the same change again: the recorded request is sent again under its key.
    resumed = plan_change_request(account=_account(user), tier=enterprise, reason="retry", actor="sam")
    assert resumed.pk == change.pk and resumed.state == "sent" and resumed.attempts == 2
    calls = _updates(fake, sub_id)
    assert [c.replayed for c in calls] == [False, True]
    assert {c.idempotency_key for c in calls} == {f"ct-plan-change-{change.pk}"}
    assert len(fake.subscription_updates) == 1  # one change, one proration invoice on Stripe
    assert len([i for i in fake.all("invoice") if i["billing_reason"] == "subscription_update"]) == 1
    assert _account(user).tier.slug == "enterprise"
    assert plan_changes_resume_task.delay().get() == []  # nothing left for the periodic job


@e2e
def test_the_periodic_job_resumes_a_change_stripe_never_answered(site, client, make_user):
    fake = site
    user = make_user("basic")
    sub_id = subscribe(fake, client, user, "pro")
    fake.fail_next = [("POST", rf"/v1/subscriptions/{sub_id}", 503)] * 5  # Stripe down
    with pytest.raises(ApplicationError):
        plan_change_request(account=_account(user), tier=Tier.objects.get(slug="enterprise"), reason="upsell",
                            actor="sam")
    fake.fail_next = []
    change = PlanChange.objects.get()
    assert change.state == "started" and "Stripe" in change.last_error
    with pytest.raises(ApplicationError, match="unfinished"):  # another change waits for this one
        plan_change_request(account=_account(user), tier=Tier.objects.get(slug="basic"), reason="no", actor="sam")
    with time_machine.travel(timezone.now() + timedelta(minutes=11), tick=True):
        assert plan_changes_resume_task.delay().get() == [change.pk]
    change.refresh_from_db()
    assert change.state == "sent" and _account(user).tier.slug == "enterprise"
    assert {c.idempotency_key for c in _updates(fake, sub_id)} == {f"ct-plan-change-{change.pk}"}


@e2e
def test_a_downgrade_by_support_waits_for_the_next_period(site, client, make_user, api):
    fake = site
    user = make_user("basic")
    sub_id = subscribe(fake, client, user, "enterprise")
    assert consume(api, user, 120_000, "d-1").status_code == 201
    invoices = len(fake.all("invoice"))

    change = plan_change_request(account=_account(user), tier=Tier.objects.get(slug="basic"),
                                 reason="customer wants to pay less", actor="sam")

    (call,) = _updates(fake, sub_id)
    assert call.params["proration_behavior"] == "none"
    assert len(fake.all("invoice")) == invoices and fake.all("invoiceitem") == []  # nothing credited or charged
    billing = BillingAccount.objects.select_related("pending_tier").get(account__user=user)
    assert _account(user).tier.slug == "enterprise" and billing.pending_tier.slug == "basic"
    assert _current(user).token_limit == 200_000  # paid for until the period ends
    deliver_all(fake, fake.take_events())
    change.refresh_from_db()
    assert change.state == "confirmed"

    deliver_all(fake, fake.subscription_renew(sub_id))
    assert _account(user).tier.slug == "basic"
    assert (_current(user).token_limit, _current(user).used) == (10_000, 0)


@e2e
def test_a_comp_is_respected_by_webhooks_while_in_force_then_ends_on_its_date(site, client, make_user):
    fake = site
    user = make_user("basic")
    sub_id = subscribe(fake, client, user, "pro")
    now = timezone.now()
    comp = comp_grant(account=_account(user), tier=Tier.objects.get(slug="enterprise"), ends_at=now + timedelta(days=5),
                      reason="conference speaker", actor="sam")
    assert _account(user).tier.slug == "enterprise" and _current(user).token_limit == 200_000
    assert fake.calls_to("POST", r"/v1/subscriptions/.*") == []  # Stripe is not changed

    # Stripe still says Pro: the renewal (a new period) and a price change keep the comp's tier.
    deliver_all(fake, fake.subscription_renew(sub_id))
    renewed = _current(user)
    assert _account(user).tier.slug == "enterprise" and renewed.token_limit == 200_000
    deliver_all(fake, fake.subscription_change_price(sub_id, price_id(fake, "basic_monthly")))
    deliver_all(fake, fake.subscription_change_price(sub_id, price_id(fake, "pro_monthly")))
    assert _account(user).tier.slug == "enterprise" and _current(user).token_limit == 200_000

    with time_machine.travel(comp.ends_at + timedelta(minutes=3), tick=True):
        assert comps_expire_task.delay().get() == 1
        assert comps_expire_task.delay().get() == 0  # safe to run twice
        assert comp_in_force(account_id=_account(user).pk) is None
        assert _account(user).tier.slug == "pro"  # what the subscription pays for
        period = period_current(account=_account(user))
        assert period.pk == renewed.pk and (period.token_limit, period.cap) == (50_000, 100_000)
    comp.refresh_from_db()
    assert comp.ended_by == "system" and comp.end_reason == "ended on its date"
    assert list(AuditLog.objects.filter(user=user, action__in=["comp_grant", "comp_end"]).order_by("id")
                .values_list("action", "actor")) == [("comp_grant", "sam"), ("comp_end", "system")]


@pytest.mark.django_db
@pytest.mark.parametrize("default_tier,returns_to", [("basic", "basic"), ("", None)])
def test_a_comp_without_a_subscription_ends_at_the_default_tier(settings, make_user, default_tier, returns_to):
    settings.DEFAULT_TIER = default_tier
    user = make_user("basic", can_pay=False)
    comp = comp_grant(account=_account(user), tier=Tier.objects.get(slug="pro"),
                      ends_at=timezone.now() + timedelta(days=1), reason="trial for a partner", actor="sam")
    period = period_current(account=_account(user))
    assert (period.token_limit, period.cap) == (50_000, 50_000)  # no way to pay: no overage room
    with time_machine.travel(comp.ends_at + timedelta(minutes=1), tick=True):
        comps_expire_task.delay()
        account = _account(user)
        assert (account.tier.slug if account.tier else None) == returns_to
        period = period_current(account=account)
        assert period.token_limit == (10_000 if returns_to else 0)


@pytest.mark.django_db
def test_a_comp_needs_a_reason_a_future_end_and_no_comp_in_force(make_user):
    account = _account(make_user("basic"))
    pro = Tier.objects.get(slug="pro")
    later = timezone.now() + timedelta(days=3)
    with pytest.raises(ApplicationError, match="reason"):
        comp_grant(account=account, tier=pro, ends_at=later, reason="  ", actor="sam")
    with pytest.raises(ApplicationError, match="future"):
        comp_grant(account=account, tier=pro, ends_at=timezone.now() - timedelta(minutes=1), reason="x", actor="sam")
    comp_grant(account=account, tier=pro, ends_at=later, reason="x", actor="sam")
    with pytest.raises(ApplicationError, match="already in force"):
        comp_grant(account=account, tier=Tier.objects.get(slug="enterprise"), ends_at=later, reason="y", actor="sam")
    assert TierComp.objects.filter(account=account).count() == 1 and _account(account.user).tier == pro


@e2e
def test_admin_says_it_changes_the_plan_through_stripe_and_acts_only_on_confirm(site, client, make_user, admin_client):
    fake = site
    user = make_user("basic")
    sub_id = subscribe(fake, client, user, "pro")
    url = f"/admin/metering/account/{_account(user).pk}/support/change-plan/"
    form = {"tier": Tier.objects.get(slug="enterprise").pk, "reason": "upgrade asked by e-mail"}
    page = admin_client.get(f"/admin/metering/account/{_account(user).pk}/change/").content.decode()
    assert 'data-support-action="change-plan"' in page and 'data-field="admin-subscription">' + sub_id in page

    asked = admin_client.post(url, form)
    assert asked.status_code == 200
    pro, ent = (TierPrice.objects.get(lookup_key=k).unit_amount_cents / 100
                for k in ("pro_monthly", "enterprise_monthly"))
    assert (f"Stripe subscription {sub_id} moves from Pro monthly (${pro:,.2f}) to Enterprise monthly (${ent:,.2f}); "
            f"the prorated difference is invoiced now") in asked.content.decode()
    assert 'name="_confirm"' in asked.content.decode()
    assert _updates(fake, sub_id) == [] and not PlanChange.objects.exists()  # nothing happened yet
    assert _account(user).tier.slug == "pro"

    done = admin_client.post(url, {**form, "_confirm": "Confirm"})
    assert done.status_code == 302
    assert len(_updates(fake, sub_id)) == 1 and PlanChange.objects.get().state == "sent"
    assert _account(user).tier.slug == "enterprise"


def test_billing_schedules_comp_ends_and_plan_change_resumes():
    from billing.schedule import periodic_jobs

    jobs = {job.name: job for job in periodic_jobs()}
    assert jobs["billing: end comps on their date"].task == "billing.tasks.comps_expire_task"
    assert jobs["billing: end comps on their date"].every_seconds == 300
    assert jobs["billing: resume unfinished plan changes"].task == "billing.tasks.plan_changes_resume_task"
