"""Billing services on their own: period bounds for lazily opened periods, and the
guard against a stale subscription state committed late."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone as dt_timezone

import pytest
from djstripe.models import Subscription

from billing.models import BillingAccount
from billing.services import subscription_apply, subscription_period_bounds
from metering.models import Account, UsagePeriod
from metering.services import period_current

from .conftest import deliver_all, e2e, subscribe

UTC = dt_timezone.utc


@pytest.mark.django_db
def test_accounts_without_stripe_keep_calendar_months(make_user):
    account = Account.objects.get(user=make_user("basic"))
    now = datetime(2026, 5, 17, 12, tzinfo=UTC)
    assert subscription_period_bounds(account, now) is None
    period = period_current(account=account, now=now)
    assert (period.starts_at, period.ends_at) == (datetime(2026, 5, 1, tzinfo=UTC), datetime(2026, 6, 1, tzinfo=UTC))


@pytest.mark.django_db
def test_a_subscribed_accounts_next_period_rolls_forward_until_stripe_confirms_it(make_user):
    account = Account.objects.get(user=make_user("pro"))
    start = datetime(2026, 1, 31, 9, tzinfo=UTC)
    BillingAccount.objects.create(account=account, stripe_customer_id="cus_x", stripe_subscription_id="sub_x",
                                  subscription_status="active", interval="month", current_period_start=start,
                                  current_period_end=datetime(2026, 2, 28, 9, tzinfo=UTC))
    assert subscription_period_bounds(account, datetime(2026, 2, 10, tzinfo=UTC)) == (
        start, datetime(2026, 2, 28, 9, tzinfo=UTC))
    assert subscription_period_bounds(account, datetime(2026, 4, 5, tzinfo=UTC)) == (
        datetime(2026, 3, 28, 9, tzinfo=UTC), datetime(2026, 4, 28, 9, tzinfo=UTC))
    period = period_current(account=account, now=datetime(2026, 3, 1, tzinfo=UTC))
    assert (period.starts_at, period.ends_at) == (datetime(2026, 2, 28, 9, tzinfo=UTC),
                                                  datetime(2026, 3, 28, 9, tzinfo=UTC))
    assert period.token_limit == 50_000


@pytest.mark.django_db
def test_after_the_paid_end_periods_are_calendar_months_from_the_paid_end(make_user):
    account = Account.objects.get(user=make_user(None))
    paid_end = datetime(2026, 3, 15, 9, tzinfo=UTC)
    BillingAccount.objects.create(account=account, stripe_customer_id="cus_y", stripe_subscription_id="sub_y",
                                  subscription_status="canceled", interval="month",
                                  current_period_start=datetime(2026, 2, 15, 9, tzinfo=UTC),
                                  current_period_end=paid_end, paid_through=paid_end)
    assert subscription_period_bounds(account, datetime(2026, 3, 1, tzinfo=UTC)) == (
        datetime(2026, 2, 15, 9, tzinfo=UTC), paid_end)
    assert subscription_period_bounds(account, datetime(2026, 3, 20, tzinfo=UTC)) == (
        paid_end, datetime(2026, 4, 1, tzinfo=UTC))
    assert subscription_period_bounds(account, datetime(2026, 4, 20, tzinfo=UTC)) is None


@e2e
def test_a_stale_subscription_state_never_moves_the_period_back(site, client, make_user):
    """Two webhooks race: one re-fetched the subscription before the renewal and commits
    after it. Its older period is ignored."""
    fake = site
    user = make_user("basic")
    sub_id = subscribe(fake, client, user, "pro")
    row = Subscription.objects.get(id=sub_id)
    stale = dict(row.stripe_data)
    deliver_all(fake, fake.subscription_renew(sub_id))
    current = UsagePeriod.objects.filter(account__user=user).latest("starts_at")
    Subscription.objects.filter(id=sub_id).update(stripe_data=stale)
    assert subscription_apply(subscription_id=sub_id) == "stale"
    assert UsagePeriod.objects.filter(account__user=user).latest("starts_at").pk == current.pk
    billing = BillingAccount.objects.get(account__user=user)
    assert billing.current_period_start == current.starts_at
    assert current.ends_at - current.starts_at == timedelta(days=30)


@pytest.mark.django_db
def test_billing_summary_for_the_dashboard(make_user):
    from billing.selectors import billing_summary
    from metering.models import Tier

    account = Account.objects.get(user=make_user("pro"))
    assert billing_summary(account=account)["has_customer"] is False
    BillingAccount.objects.create(account=account, stripe_customer_id="cus_z", subscription_status="active",
                                  cancel_at_period_end=True, pending_tier=Tier.objects.get(slug="basic"))
    summary = billing_summary(account=account)
    assert summary["has_customer"] and summary["subscription_status"] == "active"
    assert summary["cancel_at_period_end"] and summary["pending_tier"].slug == "basic"
