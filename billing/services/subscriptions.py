"""The account follows its Stripe subscription: tier, status, period, access."""
from __future__ import annotations

import logging
from datetime import datetime
from typing import Any

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from metering.models import Account, Tier
from metering.periods import calendar_month
from metering.services import account_apply_terms, account_for_user, period_align

from .. import stripe_client
from ..models import BillingAccount, SubscriptionPeriod, TierPrice
from ..selectors import tier_price_by_stripe_id
from .common import ACCOUNT_STATUS, SubscriptionState, billing_period_at, tier_rank, usage_month
from .comps import comp_in_force
from .overage import overage_bill_account_on_commit

logger = logging.getLogger(__name__)


def _subscription_data(subscription_id: str) -> dict[str, Any] | None:
    """The subscription as Stripe says it is now: dj-stripe re-fetched and synced it
    just before our receivers run; outside a webhook we fetch it ourselves."""
    from djstripe.models import Subscription

    row = Subscription.objects.filter(id=subscription_id).first()
    if row is not None and row.stripe_data:
        return dict(row.stripe_data)
    fetched = stripe_client.subscription_retrieve(subscription_id)
    if fetched is None:
        return None
    Subscription.sync_from_stripe_data(fetched, api_key=settings.STRIPE_SECRET_KEY)
    return stripe_client.as_dict(fetched)


def subscription_refresh(*, subscription_id: str) -> str:
    """Re-fetch a subscription from Stripe, sync it into dj-stripe and apply it."""
    from djstripe.models import Subscription

    fetched = stripe_client.subscription_retrieve(subscription_id)
    if fetched is None:
        logger.warning("subscription %s no longer exists on Stripe", subscription_id)
        return "missing"
    Subscription.sync_from_stripe_data(fetched, api_key=settings.STRIPE_SECRET_KEY)
    return subscription_apply(subscription_id=subscription_id)


def billing_account_for_customer(*, customer_id: str) -> BillingAccount | None:
    billing = BillingAccount.objects.filter(stripe_customer_id=customer_id).first()
    if billing is not None:
        return billing
    # A customer made elsewhere (Stripe dashboard, another checkout): dj-stripe links
    # it to its user through the customer's metadata.
    from djstripe.models import Customer

    customer = Customer.objects.filter(id=customer_id).select_related("subscriber").first()
    if customer is None or customer.subscriber_id is None:
        return None
    account = account_for_user(user_id=customer.subscriber_id)
    with transaction.atomic():
        billing, _ = BillingAccount.objects.select_for_update().get_or_create(account=account)
        if billing.stripe_customer_id and billing.stripe_customer_id != customer_id:
            logger.warning("account %s already has customer %s; ignoring customer %s", account.pk,
                           billing.stripe_customer_id, customer_id)
            return None
        billing.stripe_customer_id = customer_id
        billing.save(update_fields=["stripe_customer_id", "updated_at"])
    return billing


def subscription_apply(*, subscription_id: str, now: datetime | None = None) -> str:
    """Make the account follow its subscription as Stripe says it is now.

    Returns what happened ("applied", "stale", "unknown_price", ...). The tier
    follows the price (an upgrade at once, a downgrade at the next period), the
    usage period follows Stripe's current period (a new one is the reset), the
    status follows the subscription's. Safe to repeat: applying the same state twice
    changes nothing; a state whose period is older than the one we have is ignored.
    """
    now = now or timezone.now()
    found = _subscription_to_apply(subscription_id)
    if isinstance(found, str):
        return found
    state, billing, tier_price = found
    with transaction.atomic():
        billing = BillingAccount.objects.select_for_update().get(pk=billing.pk)
        account = Account.objects.select_for_update(of=("self",)).select_related("tier").get(pk=billing.account_id)
        ignored = _ignored_because(billing=billing, state=state)
        if ignored:
            return ignored
        if state.status in ("incomplete", "incomplete_expired"):
            _record_incomplete(billing=billing, state=state)
            return "incomplete"
        new_period = _starts_new_period(billing=billing, state=state)
        if state.status == "canceled":
            return _subscription_ended(billing=billing, account=account, state=state, now=now)
        _follow(billing=billing, account=account, state=state, tier=tier_price.tier, new_period=new_period, now=now)
    if new_period:
        overage_bill_account_on_commit(account_id=billing.account_id)
    return "applied"


def _subscription_to_apply(subscription_id: str) -> tuple[SubscriptionState, BillingAccount, TierPrice] | str:
    """The subscription, its account and its tier's price; or why there is nothing to apply."""
    data = _subscription_data(subscription_id)
    if data is None:
        logger.warning("subscription %s not found; nothing applied", subscription_id)
        return "missing"
    state = SubscriptionState.from_stripe(data)
    billing = billing_account_for_customer(customer_id=state.customer_id)
    if billing is None:
        logger.warning("subscription %s: customer %s belongs to no account; ignored", state.id, state.customer_id)
        return "unknown_customer"
    tier_price = tier_price_by_stripe_id(price_id=state.price_id)
    if tier_price is None:
        logger.error("subscription %s uses price %s, which no tier has; account %s left as it was", state.id,
                     state.price_id, billing.account_id)
        return "unknown_price"
    if state.period_start is None or state.period_end is None:
        logger.error("subscription %s has no current period; ignored", state.id)
        return "no_period"
    return state, billing, tier_price


def _ignored_because(*, billing: BillingAccount, state: SubscriptionState) -> str | None:
    """Another subscription than the account's current one that is not taking over, or a
    state older than the one applied: ignored (webhooks arrive late and out of order)."""
    other = billing.stripe_subscription_id and billing.stripe_subscription_id != state.id
    older = billing.current_period_start and state.period_start < billing.current_period_start
    if other and (state.status not in ("active", "trialing", "past_due") or older):
        logger.info("subscription %s is not the account's current one (%s); ignored", state.id,
                    billing.stripe_subscription_id)
        return "other_subscription"
    if not other and older:
        logger.info("subscription %s: period %s is older than the applied %s; stale, ignored", state.id,
                    state.period_start, billing.current_period_start)
        return "stale"
    return None


def _record_incomplete(*, billing: BillingAccount, state: SubscriptionState) -> None:
    """The first payment has not gone through: nothing is granted yet, the subscription is noted."""
    if not billing.stripe_subscription_id:
        billing.stripe_subscription_id = state.id
        billing.subscription_status = state.status
        billing.save(update_fields=["stripe_subscription_id", "subscription_status", "updated_at"])


def _starts_new_period(*, billing: BillingAccount, state: SubscriptionState) -> bool:
    """A new subscription, the first one applied, or Stripe's period moved on."""
    other = billing.stripe_subscription_id and billing.stripe_subscription_id != state.id
    return bool(other) or billing.current_period_start is None or state.period_start > billing.current_period_start


def _follow(*, billing: BillingAccount, account: Account, state: SubscriptionState, tier: Tier, new_period: bool,
            now: datetime) -> None:
    """The account takes the subscription's tier (a downgrade waits for the next period),
    status and period; its usage period follows Stripe's."""
    comp = comp_in_force(account_id=account.pk, now=now)
    if comp is not None:
        account.tier = comp.tier  # a comp wins while in force; its end brings back what this price buys
        billing.pending_tier = None
    elif new_period or tier_rank(tier) >= tier_rank(account.tier):
        account.tier = tier
        billing.pending_tier = None
    else:
        billing.pending_tier = tier  # a downgrade: at the next period
    account.status = ACCOUNT_STATUS.get(state.status, account.status)
    # A live subscription is a way to pay: overage can be invoiced (unpaid/paused is not).
    account.can_pay = state.status in BillingAccount.LIVE_STATUSES or customer_can_pay(billing)
    if state.status in ("past_due", "unpaid") and billing.payment_failed_at is None:
        billing.payment_failed_at = now
    billing.stripe_subscription_id = state.id
    billing.stripe_price_id = state.price_id
    billing.subscription_status = state.status
    billing.interval = state.interval
    billing.current_period_start = state.period_start
    billing.current_period_end = state.period_end
    billing.cancel_at_period_end = state.cancel_at_period_end
    billing.paid_through = None
    billing.access_ended_at = None
    billing.full_clean()
    billing.save()
    account.save(update_fields=["tier", "status", "can_pay"])
    # Allowances are monthly whatever the interval: the usage period is the month of
    # Stripe's (monthly or yearly) billing period in which we are.
    month_start, month_end = usage_month(start=state.period_start, end=state.period_end, interval=state.interval,
                                         now=now)
    period = period_align(account=account, starts_at=month_start, ends_at=month_end)
    SubscriptionPeriod.objects.get_or_create(period=period, defaults={
        "billing_account": billing, "stripe_subscription_id": state.id})
    account_apply_terms(account=account, now=now)


def _subscription_ended(*, billing: BillingAccount, account: Account, state: SubscriptionState,
                        now: datetime) -> str:
    """Canceled: the account keeps what it paid for until the paid period ends."""
    paid_through = state.period_end or billing.current_period_end or state.ended_at or now
    billing.stripe_subscription_id = state.id
    billing.subscription_status = "canceled"
    billing.cancel_at_period_end = False
    billing.pending_tier = None
    billing.paid_through = paid_through
    if billing.current_period_start is None and state.period_start is not None:
        billing.current_period_start, billing.current_period_end = state.period_start, state.period_end
    billing.save()
    account.status = Account.Status.CANCELED
    account.save(update_fields=["status"])
    if paid_through <= now and billing.access_ended_at is None:
        _access_end(billing=billing, account=account, now=now)
    return "canceled"


def _access_end(*, billing: BillingAccount, account: Account, now: datetime) -> None:
    """The paid time is over: the account is under the same policy as a new one (the
    DEFAULT_TIER, or none), and has overage room only with a payment method on file."""
    comp = comp_in_force(account_id=account.pk, now=now)  # a comp outlives the paid time until it ends
    account.tier = comp.tier if comp is not None else (
        Tier.objects.filter(slug=settings.DEFAULT_TIER).first() if settings.DEFAULT_TIER else None)
    account.can_pay = customer_can_pay(billing)
    account.save(update_fields=["tier", "can_pay"])
    billing.access_ended_at = now
    billing.save(update_fields=["access_ended_at", "updated_at"])
    account_apply_terms(account=account, now=now)
    overage_bill_account_on_commit(account_id=account.pk)  # the last paid period's overage


def subscriptions_expire(*, now: datetime | None = None) -> int:
    """Periodic: end access for canceled subscriptions whose paid time is over."""
    now = now or timezone.now()
    ended = 0
    for billing_id in BillingAccount.objects.filter(subscription_status="canceled", paid_through__lte=now,
                                                    access_ended_at__isnull=True).values_list("pk", flat=True):
        with transaction.atomic():
            billing = BillingAccount.objects.select_for_update().get(pk=billing_id)
            if billing.access_ended_at is not None or billing.subscription_status != "canceled":
                continue
            account = Account.objects.select_for_update().get(pk=billing.account_id)
            _access_end(billing=billing, account=account, now=now)
            ended += 1
    return ended


def subscription_period_bounds(account: Any, now: datetime) -> tuple[datetime, datetime] | None:
    """Registered with metering: where a lazily opened period of a subscribed account
    starts and ends. Usage periods are the months of the billing period (a yearly one is
    twelve), anchored on its start; until the renewal webhook arrives, the next billing
    period is Stripe's rolled forward by the interval, and the webhook then confirms it."""
    billing = BillingAccount.objects.filter(account_id=account.pk).first()
    if billing is None or billing.current_period_start is None or billing.current_period_end is None:
        return None
    if now < billing.current_period_start:
        return None
    if billing.paid_through is not None:
        if now < billing.paid_through:
            return usage_month(start=billing.current_period_start, end=billing.paid_through, interval=billing.interval,
                               now=now)
        # After the paid end: calendar months, the first one starting at the paid end.
        _, month_end = calendar_month(billing.paid_through)
        return (billing.paid_through, month_end) if now < month_end else None
    start, end = billing_period_at(start=billing.current_period_start, end=billing.current_period_end,
                                   interval=billing.interval, now=now)
    return usage_month(start=start, end=end, interval=billing.interval, now=now)


def customer_can_pay(billing: BillingAccount) -> bool:
    """Whether the Stripe customer has a way to pay without a subscription: a default payment
    method (or source) for invoices, as dj-stripe last synced it."""
    if not billing.stripe_customer_id:
        return False
    from djstripe.models import Customer

    customer = Customer.objects.filter(id=billing.stripe_customer_id).first()
    data = dict(customer.stripe_data or {}) if customer is not None else {}
    settings_ = data.get("invoice_settings") or {}
    return bool(settings_.get("default_payment_method") or data.get("default_source"))


def customer_payment_apply(*, customer_id: str, now: datetime | None = None) -> str:
    """`customer.updated`: a payment method added or removed. An account without a live
    subscription gets overage room exactly while its customer can pay."""
    now = now or timezone.now()
    billing = billing_account_for_customer(customer_id=customer_id)
    if billing is None:
        return "unknown_customer"
    with transaction.atomic():
        billing = BillingAccount.objects.select_for_update().get(pk=billing.pk)
        account = Account.objects.select_for_update(of=("self",)).select_related("tier").get(pk=billing.account_id)
        can_pay = billing.subscription_live or customer_can_pay(billing)
        if account.can_pay == can_pay:
            return "unchanged"
        account.can_pay = can_pay
        account.save(update_fields=["can_pay"])
        account_apply_terms(account=account, now=now)
    return "applied"
