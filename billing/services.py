"""Billing's business rules: Stripe subscriptions drive the account's tier, status
and usage period; a period's overage goes back to Stripe as one invoice item.

Webhook receivers, views, tasks, admin and `setup_stripe` call these. Each one
owns its transactions; Stripe is only called outside them (through
`stripe_client`), except for the reads dj-stripe itself makes while it
processes a webhook.
"""
from __future__ import annotations

import hashlib
import logging
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone as dt_timezone
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

from django.conf import settings
from django.db import transaction
from django.db.models import F, Max, Sum
from django.db.models.functions import Coalesce
from django.urls import reverse
from django.utils import timezone

from consensus_tokens.errors import ApplicationError
from metering.models import Account, Tier, UsagePeriod
from metering.periods import calendar_month
from metering.services import account_apply_terms, account_for_user, period_align

from . import stripe_client
from .models import BillingAccount, OverageInvoice, SubscriptionPeriod, TierPrice
from .selectors import tier_price_active, tier_price_by_stripe_id

logger = logging.getLogger(__name__)

# The events our webhook endpoint asks Stripe for.
WEBHOOK_EVENTS = [
    "customer.subscription.created",
    "customer.subscription.updated",
    "customer.subscription.deleted",
    "invoice.payment_succeeded",
    "invoice.payment_failed",
    "invoice.upcoming",
]
CURRENCY = "usd"
INTERVALS = ("month", "year")


class AlreadySubscribed(ApplicationError):
    status, code = 409, "already_subscribed"


class UnknownTier(ApplicationError):
    status, code = 400, "unknown_tier"


class PriceNotSetUp(ApplicationError):
    status, code = 503, "price_not_set_up"


# --- small helpers --------------------------------------------------------------------------------

def _ts(value: Any) -> datetime | None:
    return datetime.fromtimestamp(int(value), tz=dt_timezone.utc) if value else None


def _epoch(value: datetime) -> int:
    return int(value.timestamp())


def _id(value: Any) -> str:
    if isinstance(value, dict):
        return str(value.get("id") or "")
    return str(value or "")


def add_months(moment: datetime, months: int) -> datetime:
    """`moment` plus whole months, the day clamped to the month's length (Jan 31 + 1 = Feb 28/29),
    as Stripe does for monthly billing anchors."""
    month0 = moment.month - 1 + months
    year, month = moment.year + month0 // 12, month0 % 12 + 1
    next_first = datetime(year + (month // 12), month % 12 + 1, 1, tzinfo=moment.tzinfo)
    last_day = (next_first - timedelta(days=1)).day
    return moment.replace(year=year, month=month, day=min(moment.day, last_day))


def overage_cents(tokens: int, rate: Decimal) -> int:
    """tokens × rate in USD, to integer cents, rounded half-up (once, for the whole period)."""
    return int((Decimal(tokens) * Decimal(rate) * 100).quantize(Decimal(1), rounding=ROUND_HALF_UP))


def _tier_rank(tier: Tier | None) -> tuple[int, int]:
    if tier is None:
        return (-1, -1)
    return (tier.monthly_token_limit, tier.monthly_price_cents)


@dataclass(frozen=True)
class SubscriptionState:
    """What Stripe says about a subscription, in both the current API format (the period
    on the subscription item) and the older one (the period on the subscription)."""

    id: str
    customer_id: str
    status: str
    price_id: str
    interval: str
    period_start: datetime | None
    period_end: datetime | None
    cancel_at_period_end: bool
    ended_at: datetime | None

    @classmethod
    def from_stripe(cls, data: dict[str, Any]) -> SubscriptionState:
        items = (data.get("items") or {}).get("data") or []
        item = items[0] if items else {}
        price = item.get("price") or data.get("plan") or {}
        recurring = price.get("recurring") or {}
        start = item.get("current_period_start") or data.get("current_period_start")
        end = item.get("current_period_end") or data.get("current_period_end")
        return cls(id=data["id"], customer_id=_id(data.get("customer")), status=data.get("status") or "",
                   price_id=_id(price), interval=recurring.get("interval") or price.get("interval") or "",
                   period_start=_ts(start), period_end=_ts(end),
                   cancel_at_period_end=bool(data.get("cancel_at_period_end")), ended_at=_ts(data.get("ended_at")))


ACCOUNT_STATUS = {
    "active": Account.Status.ACTIVE,
    "trialing": Account.Status.TRIALING,
    "past_due": Account.Status.PAST_DUE,
    "unpaid": Account.Status.PAST_DUE,
    "paused": Account.Status.PAST_DUE,
    "canceled": Account.Status.CANCELED,
}


# --- customers, checkout and portal ---------------------------------------------------------------

def billing_account_get_or_create(*, account: Account) -> BillingAccount:
    billing, _ = BillingAccount.objects.get_or_create(account=account)
    return billing


def customer_ensure(*, user: Any) -> BillingAccount:
    """The user's billing account with a Stripe customer, created on first use. The
    idempotency key is the account's, so a retried or concurrent first checkout
    makes one customer."""
    account = account_for_user(user_id=user.pk)
    billing = billing_account_get_or_create(account=account)
    if billing.stripe_customer_id:
        return billing
    customer = stripe_client.customer_create(
        email=user.email or "", name=user.get_full_name() or user.get_username(),
        metadata={"djstripe_subscriber": str(user.pk), "account_id": str(account.pk)},
        idempotency_key=f"ct-customer-{account.pk}")
    with transaction.atomic():
        billing = BillingAccount.objects.select_for_update().get(pk=billing.pk)
        if not billing.stripe_customer_id:
            billing.stripe_customer_id = customer["id"]
            billing.save(update_fields=["stripe_customer_id", "updated_at"])
    _djstripe_sync_customer(customer)
    return billing


def _djstripe_sync_customer(customer: Any) -> None:
    from djstripe.models import Customer

    Customer.sync_from_stripe_data(customer, api_key=settings.STRIPE_SECRET_KEY)


def _time_bucket(now: datetime, seconds: int) -> int:
    return int(now.timestamp()) // seconds


def checkout_session_create(*, user: Any, tier_slug: str, interval: str, now: datetime | None = None) -> str:
    """Start a Stripe Checkout for a tier; returns the URL to send the user to.

    The idempotency key covers the user, the price and a ten-minute window: a double
    click gets the same session, a later attempt a new one."""
    now = now or timezone.now()
    if interval not in INTERVALS:
        raise ApplicationError("Interval must be 'month' or 'year'.", code="invalid_request",
                               extra={"fields": {"interval": ["Must be 'month' or 'year'."]}})
    stripe_client.require_configured()  # fail early, and clearly
    tier = Tier.objects.filter(slug=tier_slug).first()
    if tier is None:
        raise UnknownTier(f"Unknown tier '{tier_slug}'.")
    price = tier_price_active(tier=tier, interval=interval)
    if price is None:
        raise PriceNotSetUp(f"No Stripe price for {tier.slug} ({interval}); run `manage.py setup_stripe`.")
    billing = customer_ensure(user=user)
    if billing.stripe_subscription_id and billing.subscription_status in ("active", "trialing", "past_due"):
        raise AlreadySubscribed("You already have a subscription; change plans in the billing portal.")
    session = stripe_client.checkout_session_create(
        customer_id=billing.stripe_customer_id or "", price_id=price.stripe_price_id,
        success_url=f"{settings.SITE_URL}/dashboard/?checkout=success",
        cancel_url=f"{settings.SITE_URL}/dashboard/?checkout=canceled",
        client_reference_id=str(user.pk), metadata={"account_id": str(billing.account_id), "tier": tier.slug},
        idempotency_key=f"ct-checkout-{billing.account_id}-{price.stripe_price_id}-{_time_bucket(now, 600)}")
    return str(session["url"])


def portal_session_create(*, user: Any, now: datetime | None = None) -> str:
    now = now or timezone.now()
    stripe_client.require_configured()
    billing = customer_ensure(user=user)
    session = stripe_client.portal_session_create(
        customer_id=billing.stripe_customer_id or "", return_url=f"{settings.SITE_URL}/dashboard/",
        idempotency_key=f"ct-portal-{billing.account_id}-{_time_bucket(now, 60)}")
    return str(session["url"])


# --- subscriptions --------------------------------------------------------------------------------

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


def _billing_for_customer(customer_id: str) -> BillingAccount | None:
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
    data = _subscription_data(subscription_id)
    if data is None:
        logger.warning("subscription %s not found; nothing applied", subscription_id)
        return "missing"
    state = SubscriptionState.from_stripe(data)
    billing = _billing_for_customer(state.customer_id)
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

    new_period = False
    with transaction.atomic():
        billing = BillingAccount.objects.select_for_update().get(pk=billing.pk)
        account = Account.objects.select_for_update(of=("self",)).select_related("tier").get(pk=billing.account_id)
        other = billing.stripe_subscription_id and billing.stripe_subscription_id != state.id
        if other and (state.status not in ("active", "trialing", "past_due") or (
                billing.current_period_start and state.period_start < billing.current_period_start)):
            logger.info("subscription %s is not the account's current one (%s); ignored", state.id,
                        billing.stripe_subscription_id)
            return "other_subscription"
        if not other and billing.current_period_start and state.period_start < billing.current_period_start:
            logger.info("subscription %s: period %s is older than the applied %s; stale, ignored", state.id,
                        state.period_start, billing.current_period_start)
            return "stale"
        if state.status in ("incomplete", "incomplete_expired"):
            # The first payment has not gone through: nothing is granted yet.
            if not billing.stripe_subscription_id:
                billing.stripe_subscription_id = state.id
                billing.subscription_status = state.status
                billing.save(update_fields=["stripe_subscription_id", "subscription_status", "updated_at"])
            return "incomplete"

        new_period = bool(other) or billing.current_period_start is None or \
            state.period_start > billing.current_period_start
        if state.status == "canceled":
            result = _subscription_ended(billing=billing, account=account, state=state, now=now)
            return result

        new_tier = tier_price.tier
        if new_period or _tier_rank(new_tier) >= _tier_rank(account.tier):
            account.tier = new_tier
            billing.pending_tier = None
        else:
            billing.pending_tier = new_tier  # a downgrade: at the next period
        account.status = ACCOUNT_STATUS.get(state.status, account.status)
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
        account.save(update_fields=["tier", "status"])
        period = period_align(account=account, starts_at=state.period_start, ends_at=state.period_end)
        SubscriptionPeriod.objects.get_or_create(period=period, defaults={
            "billing_account": billing, "stripe_subscription_id": state.id})
        account_apply_terms(account=account, now=now)
    if new_period:
        _bill_ended_periods_on_commit(account_id=billing.account_id)
    return "applied"


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
    default = settings.BILLING_DEFAULT_TIER
    account.tier = Tier.objects.filter(slug=default).first() if default else None
    account.save(update_fields=["tier"])
    billing.access_ended_at = now
    billing.save(update_fields=["access_ended_at", "updated_at"])
    account_apply_terms(account=account, now=now)
    _bill_ended_periods_on_commit(account_id=account.pk)  # the last paid period's overage


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
    starts and ends. Until the renewal webhook arrives, the next period is Stripe's
    period rolled forward by the interval; the webhook then confirms it."""
    billing = BillingAccount.objects.filter(account_id=account.pk).first()
    if billing is None or billing.current_period_start is None or billing.current_period_end is None:
        return None
    if billing.paid_through is not None:
        if now < billing.paid_through:
            return billing.current_period_start, billing.paid_through
        # After the paid end: calendar months, the first one starting at the paid end.
        _, month_end = calendar_month(billing.paid_through)
        return (billing.paid_through, month_end) if now < month_end else None
    start, end = billing.current_period_start, billing.current_period_end
    if now < start:
        return None
    months = 12 if billing.interval == "year" else 1
    steps = 0
    while end <= now:
        steps += 1
        start, end = end, add_months(billing.current_period_end, months * steps)
    return start, end


# --- invoices and payments ------------------------------------------------------------------------

def _invoice_data(invoice_id: str) -> dict[str, Any] | None:
    from djstripe.models import Invoice

    row = Invoice.objects.filter(id=invoice_id).first()
    return dict(row.stripe_data) if row is not None and row.stripe_data else None


def _invoice_subscription_id(data: dict[str, Any]) -> str:
    parent = data.get("parent") or {}
    details = parent.get("subscription_details") or {}
    return _id(details.get("subscription")) or _id(data.get("subscription"))


def _invoice_item_ids(data: dict[str, Any]) -> list[str]:
    ids = []
    for line in (data.get("lines") or {}).get("data") or []:
        parent = line.get("parent") or {}
        details = parent.get("invoice_item_details") or {}
        item = _id(details.get("invoice_item")) or _id(line.get("invoice_item"))
        if item:
            ids.append(item)
    return ids


def invoice_payment_succeeded(*, invoice_id: str, now: datetime | None = None) -> str:
    """Paid: the overage items on it are paid, the grace clock and any hold are
    lifted, and the subscription (its new period) is confirmed from Stripe."""
    now = now or timezone.now()
    data = _invoice_data(invoice_id)
    if data is None:
        logger.warning("invoice %s not synced; nothing applied", invoice_id)
        return "missing"
    if data.get("status") != "paid":
        logger.info("invoice %s is %s now, not paid; ignored", invoice_id, data.get("status"))
        return "not_paid"
    billing = _billing_for_customer(_id(data.get("customer")))
    if billing is None:
        return "unknown_customer"
    # The subscription first: its rows are locked in the same order as a subscription
    # webhook locks them (dj-stripe's row, then ours), so concurrent webhooks cannot deadlock.
    subscription_id = _invoice_subscription_id(data)
    if subscription_id:
        subscription_refresh(subscription_id=subscription_id)
    with transaction.atomic():
        OverageInvoice.objects.filter(stripe_invoice_item_id__in=_invoice_item_ids(data)).exclude(
            state=OverageInvoice.State.PAID).update(state=OverageInvoice.State.PAID, stripe_invoice_id=invoice_id,
                                                    updated_at=now)
        billing = BillingAccount.objects.select_for_update().get(pk=billing.pk)
        if billing.subscription_status in ("past_due", "unpaid"):
            # An older invoice paid late: Stripe still says the subscription is past due
            # (a newer invoice is unpaid), so the grace clock and any hold stay.
            return "paid_still_past_due"
        account = Account.objects.select_for_update().get(pk=billing.account_id)
        was_held = account.billing_hold
        billing.payment_failed_at = None
        billing.save(update_fields=["payment_failed_at", "updated_at"])
        account.billing_hold = False
        if account.status == Account.Status.PAST_DUE:
            account.status = Account.Status.ACTIVE
        account.save(update_fields=["billing_hold", "status"])
        if was_held:
            account_apply_terms(account=account, now=now)
    return "paid"


def invoice_payment_failed(*, invoice_id: str, now: datetime | None = None) -> str:
    """Failed: the account is past due; the grace clock starts (once)."""
    now = now or timezone.now()
    data = _invoice_data(invoice_id)
    if data is None:
        return "missing"
    if data.get("status") == "paid":
        logger.info("invoice %s failed earlier but is paid now; ignored", invoice_id)
        return "already_paid"
    billing = _billing_for_customer(_id(data.get("customer")))
    if billing is None:
        return "unknown_customer"
    if billing.current_period_start is None:
        # The first payment of a checkout failed: nothing was granted, nothing to hold.
        return "not_subscribed"
    with transaction.atomic():
        OverageInvoice.objects.filter(stripe_invoice_item_id__in=_invoice_item_ids(data),
                                      state=OverageInvoice.State.CREATED).update(
            state=OverageInvoice.State.FAILED, stripe_invoice_id=invoice_id, updated_at=now)
        billing = BillingAccount.objects.select_for_update().get(pk=billing.pk)
        account = Account.objects.select_for_update().get(pk=billing.account_id)
        if billing.payment_failed_at is None:
            billing.payment_failed_at = now
            billing.save(update_fields=["payment_failed_at", "updated_at"])
        account.status = Account.Status.PAST_DUE
        account.save(update_fields=["status"])
        _hold_if_grace_over(billing=billing, account=account, now=now)
    return "past_due"


def _hold_if_grace_over(*, billing: BillingAccount, account: Account, now: datetime) -> bool:
    grace = timedelta(days=settings.BILLING_GRACE_PERIOD_DAYS)
    if billing.payment_failed_at is None or account.billing_hold or billing.payment_failed_at + grace > now:
        return False
    account.billing_hold = True
    account.save(update_fields=["billing_hold"])
    account_apply_terms(account=account, now=now)
    logger.info("account %s: payment failed %s, grace over: included tokens only", account.pk,
                billing.payment_failed_at)
    return True


def billing_holds_apply(*, now: datetime | None = None) -> int:
    """Periodic: hold accounts whose payment failed longer ago than the grace period."""
    now = now or timezone.now()
    cutoff = now - timedelta(days=settings.BILLING_GRACE_PERIOD_DAYS)
    held = 0
    for billing_id in BillingAccount.objects.filter(payment_failed_at__lte=cutoff, account__billing_hold=False
                                                    ).values_list("pk", flat=True):
        with transaction.atomic():
            billing = BillingAccount.objects.select_for_update().get(pk=billing_id)
            account = Account.objects.select_for_update().get(pk=billing.account_id)
            held += _hold_if_grace_over(billing=billing, account=account, now=now)
    return held


def invoice_upcoming(*, customer_id: str, now: datetime | None = None) -> int:
    """Stripe is about to invoice: put the overage accrued so far on that invoice
    (billing after commit, outside the webhook's transaction). Returns the periods queued."""
    now = now or timezone.now()
    billing = BillingAccount.objects.filter(stripe_customer_id=customer_id).first()
    if billing is None or billing.current_period_start is None:
        return 0
    ids = list(UsagePeriod.objects.filter(subscription_link__billing_account=billing, starts_at__lte=now,
                                          used__gt=F("token_limit")).values_list("pk", flat=True))
    for period_id in ids:
        _overage_on_commit(period_id=period_id, reason="upcoming_invoice")
    return len(ids)


# --- overage invoicing ----------------------------------------------------------------------------

def _overage_on_commit(*, period_id: int, reason: str) -> None:
    from .tasks import overage_invoice_period_task

    transaction.on_commit(lambda: overage_invoice_period_task.delay(period_id, reason), robust=True)


def _bill_ended_periods_on_commit(*, account_id: int) -> None:
    from .tasks import overage_bill_ended_periods_task

    transaction.on_commit(lambda: overage_bill_ended_periods_task.delay(account_id), robust=True)


def _overage_record(*, period: UsagePeriod, billing: BillingAccount, reason: str) -> OverageInvoice | None:
    """Record the next item for the period (state STARTED), or None if nothing is owed."""
    billed = OverageInvoice.objects.filter(period=period).aggregate(
        through=Coalesce(Max("through_tokens"), 0), cents=Coalesce(Sum("amount_cents"), 0))
    through = period.overage_tokens
    if through <= billed["through"]:
        return None
    rate = Decimal(period.overage_rate)
    amount = overage_cents(through, rate) - billed["cents"]
    if amount <= 0:
        return None  # under a cent so far: the cursor waits, so the period is still rounded once
    tokens = through - billed["through"]
    key = f"ct-overage-{period.pk}-{through}"
    subscription_id = billing.stripe_subscription_id if billing.subscription_status in (
        "active", "trialing", "past_due") else ""
    params = {
        "customer_id": billing.stripe_customer_id,
        "amount_cents": amount,
        "currency": CURRENCY,
        "description": (f"Token overage {period.starts_at:%Y-%m-%d} to {period.ends_at:%Y-%m-%d}: "
                        f"{tokens:,} tokens at ${rate.normalize():f}/token"),
        "metadata": {"period_id": str(period.pk), "through_tokens": str(through), "account_id": str(period.account_id)},
        "period_start": _epoch(period.starts_at),
        "period_end": _epoch(period.ends_at),
        "subscription_id": subscription_id or None,
    }
    invoice = OverageInvoice(period=period, billing_account=billing, through_tokens=through, tokens=tokens, rate=rate,
                             amount_cents=amount, currency=CURRENCY, idempotency_key=key, reason=reason,
                             stripe_params=params)
    invoice.full_clean()
    invoice.save()
    return invoice


def overage_invoice_period(*, period_id: int, reason: str = "period_end") -> OverageInvoice | None:
    """Bill a period's overage not billed yet as one Stripe invoice item.

    1. Under a lock on the billing account: resume an unfinished (STARTED) item, or
       record the next one as STARTED and commit. 2. Call Stripe with the row's
    idempotency key and parameters. 3. Mark it CREATED. A crash after 2 leaves the
    row STARTED; the next run repeats 2 with the same key and Stripe returns the
    item it already made, so the customer is billed once."""
    with transaction.atomic():
        period = UsagePeriod.objects.select_related("account").get(pk=period_id)
        billing = BillingAccount.objects.select_for_update().filter(account_id=period.account_id).first()
        if billing is None or not billing.stripe_customer_id or billing.current_period_start is None:
            return None
        if not SubscriptionPeriod.objects.filter(period_id=period_id, billing_account=billing).exists():
            return None  # a calendar-month period: Stripe bills no overage for it
        invoice = OverageInvoice.objects.filter(period=period, state=OverageInvoice.State.STARTED).first()
        if invoice is None:
            invoice = _overage_record(period=period, billing=billing, reason=reason)
    if invoice is None:
        return None
    return overage_invoice_push(overage_invoice_id=invoice.pk)


def overage_invoice_push(*, overage_invoice_id: int) -> OverageInvoice:
    """Steps 2 and 3 above for one recorded item; also what staff's retry runs."""
    invoice = OverageInvoice.objects.get(pk=overage_invoice_id)
    if invoice.state != OverageInvoice.State.STARTED:
        return invoice
    OverageInvoice.objects.filter(pk=invoice.pk).update(attempts=F("attempts") + 1)
    try:
        item = stripe_client.invoice_item_create(idempotency_key=invoice.idempotency_key, **invoice.stripe_params)
    except ApplicationError as exc:
        OverageInvoice.objects.filter(pk=invoice.pk).update(last_error=str(exc)[:2000])
        raise
    with transaction.atomic():
        OverageInvoice.objects.filter(pk=invoice.pk, state=OverageInvoice.State.STARTED).update(
            state=OverageInvoice.State.CREATED, stripe_invoice_item_id=item["id"], last_error="",
            updated_at=timezone.now())
    invoice.refresh_from_db()
    # Early overage is invoiced now; so is overage of a subscription that has ended,
    # as no renewal invoice will come to carry the pending item.
    if (invoice.reason == "threshold" or not invoice.stripe_params.get("subscription_id")) \
            and not invoice.stripe_invoice_id:
        _invoice_now(invoice=invoice)
    return invoice


def _invoice_now(*, invoice: OverageInvoice) -> None:
    """Early overage: invoice the pending item now instead of with the next renewal."""
    try:
        stripe_invoice = stripe_client.invoice_create_now(
            customer_id=invoice.stripe_params["customer_id"], description="Token overage",
            metadata={"overage_invoice_id": str(invoice.pk)}, idempotency_key=f"{invoice.idempotency_key}-invoice")
    except ApplicationError:
        # The item stays pending on the customer and goes out with the next invoice.
        logger.exception("early invoice for overage item %s failed", invoice.pk)
        return
    OverageInvoice.objects.filter(pk=invoice.pk, stripe_invoice_id="").update(stripe_invoice_id=stripe_invoice["id"])


def overage_bill_ended_periods(*, now: datetime | None = None, account_id: int | None = None) -> list[int]:
    """Periodic (and after each period change): bill every ended period with
    overage not billed yet, and resume unfinished items. Safe to run twice."""
    now = now or timezone.now()
    periods = UsagePeriod.objects.filter(ends_at__lte=now, subscription_link__isnull=False)
    if account_id is not None:
        periods = periods.filter(account_id=account_id)
    unbilled = periods.filter(used__gt=F("token_limit")).annotate(
        billed=Coalesce(Max("overage_invoices__through_tokens"), 0)).filter(billed__lt=F("used") - F("token_limit"))
    ids = set(unbilled.values_list("pk", flat=True))
    # Items left unfinished by a crash are resumed whatever their period (an early or
    # upcoming-invoice item may belong to a period still open).
    unfinished = OverageInvoice.objects.filter(state=OverageInvoice.State.STARTED)
    if account_id is not None:
        unfinished = unfinished.filter(period__account_id=account_id)
    ids |= set(unfinished.values_list("period_id", flat=True))
    done = []
    for period_id in sorted(ids):
        try:
            if overage_invoice_period(period_id=period_id, reason="period_end") is not None:
                done.append(period_id)
        except ApplicationError:
            logger.exception("overage billing of period %s failed; it is retried on the next run", period_id)
    return done


def overage_bill_thresholds(*, now: datetime | None = None) -> list[int]:
    """Periodic: bill open periods early once their unbilled overage charge passes the
    tier's threshold (like Stripe's billing thresholds)."""
    now = now or timezone.now()
    candidates = UsagePeriod.objects.filter(
        starts_at__lte=now, ends_at__gt=now, used__gt=F("token_limit"),
        account__tier__overage_billing_threshold_cents__isnull=False, subscription_link__isnull=False,
    ).select_related("account__tier")
    done = []
    for period in candidates:
        billed = OverageInvoice.objects.filter(period=period).aggregate(cents=Coalesce(Sum("amount_cents"), 0))
        accrued = overage_cents(period.overage_tokens, Decimal(period.overage_rate)) - billed["cents"]
        threshold = period.account.tier.overage_billing_threshold_cents if period.account.tier else None
        if threshold is None or accrued < threshold:
            continue
        try:
            if overage_invoice_period(period_id=period.pk, reason="threshold") is not None:
                done.append(period.pk)
        except ApplicationError:
            logger.exception("early overage billing of period %s failed", period.pk)
    return done


# --- webhooks ------------------------------------------------------------------------------------

def webhook_trigger_retry(*, trigger_id: int) -> Any:
    """Process a stored webhook again (staff's retry in admin). A trigger that failed
    rolled back everything it did, so processing it again is the first time."""
    from traceback import format_exc

    from djstripe.models import WebhookEventTrigger
    from djstripe.settings import djstripe_settings

    trigger = WebhookEventTrigger.objects.select_related("webhook_endpoint").get(pk=trigger_id)
    if not trigger.valid:
        raise ApplicationError("This webhook did not pass signature verification; it cannot be processed.",
                               code="webhook_invalid")
    if trigger.processed:
        return trigger
    endpoint = trigger.webhook_endpoint
    api_key = djstripe_settings.get_default_api_key(endpoint.livemode if endpoint else None)
    try:
        with transaction.atomic():
            trigger.process(save=False, api_key=api_key)
            trigger.save()
    except Exception as exc:
        trigger.refresh_from_db()
        trigger.exception = str(exc)[:128]
        trigger.traceback = format_exc()
        trigger.save(update_fields=["exception", "traceback", "updated"])
        raise ApplicationError(f"Processing failed again: {exc}", code="webhook_failed") from exc
    return trigger


# --- setup_stripe --------------------------------------------------------------------------------

@dataclass
class SetupReport:
    created: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    existing: list[str] = field(default_factory=list)


def webhook_endpoint_url() -> tuple[str, uuid.UUID]:
    """Our endpoint's URL; its UUID is derived from SITE_URL so every run (and every
    process) names the same endpoint."""
    endpoint_uuid = uuid.uuid5(uuid.NAMESPACE_URL, f"{settings.SITE_URL}/stripe/webhook")
    path = reverse("djstripe:djstripe_webhook_by_uuid", kwargs={"uuid": endpoint_uuid})
    return f"{settings.SITE_URL}{path}", endpoint_uuid


def stripe_setup() -> SetupReport:
    """Create or update the Products and Prices of every priced tier and our webhook
    endpoint in Stripe, sync them into dj-stripe and link prices to tiers. Safe to
    run again: things are found by id / lookup key first, and creates carry
    idempotency keys."""
    from djstripe.models import Price, Product

    stripe_client.require_configured()
    report = SetupReport()
    key = settings.STRIPE_SECRET_KEY
    for tier in Tier.objects.all():
        if not (tier.monthly_price_cents or tier.yearly_price_cents):
            continue
        product_id = f"ct_tier_{tier.slug}"
        product = stripe_client.product_retrieve(product_id)
        if product is None:
            product = stripe_client.product_create(product_id=product_id, name=f"Consensus Tokens {tier.name}",
                                                   metadata={"tier": tier.slug},
                                                   idempotency_key=f"ct-setup-product-{tier.slug}")
            report.created.append(f"product {product_id}")
        elif product["name"] != f"Consensus Tokens {tier.name}":
            product = stripe_client.product_update(product_id=product_id, name=f"Consensus Tokens {tier.name}")
            report.updated.append(f"product {product_id}")
        else:
            report.existing.append(f"product {product_id}")
        Product.sync_from_stripe_data(product, api_key=key)

        for interval, amount in (("month", tier.monthly_price_cents), ("year", tier.yearly_price_cents)):
            if not amount:
                continue
            lookup_key = f"{tier.slug}_{interval}ly"
            found = stripe_client.prices_by_lookup_keys([lookup_key])
            current = found[0] if found else None
            if (current is not None and current["unit_amount"] == amount and current["currency"] == CURRENCY
                    and (current["recurring"] or {}).get("interval") == interval
                    and _id(current["product"]) == product_id):
                price = current
                report.existing.append(f"price {lookup_key} ({price['id']})")
            else:
                price = stripe_client.price_create(
                    product_id=product_id, unit_amount_cents=amount, currency=CURRENCY, interval=interval,
                    lookup_key=lookup_key, metadata={"tier": tier.slug, "interval": interval},
                    transfer_lookup_key=current is not None,
                    idempotency_key=f"ct-setup-price-{lookup_key}-{amount}")
                report.created.append(f"price {lookup_key} ({price['id']})")
                if current is not None and current["id"] != price["id"]:
                    Price.sync_from_stripe_data(stripe_client.price_deactivate(current["id"]), api_key=key)
            Price.sync_from_stripe_data(price, api_key=key)
            with transaction.atomic():
                TierPrice.objects.filter(tier=tier, interval=interval, active=True).exclude(
                    stripe_price_id=price["id"]).update(active=False)
                TierPrice.objects.update_or_create(
                    stripe_price_id=price["id"],
                    defaults={"tier": tier, "interval": interval, "lookup_key": lookup_key,
                              "unit_amount_cents": amount, "active": True})
    _webhook_endpoint_setup(report=report)
    return report


def _webhook_endpoint_setup(*, report: SetupReport) -> None:
    from djstripe.models import WebhookEndpoint

    url, endpoint_uuid = webhook_endpoint_url()
    local = WebhookEndpoint.objects.filter(djstripe_uuid=endpoint_uuid).first()
    remote = {e["id"]: e for e in stripe_client.webhook_endpoints_list()}
    if local is not None and local.id in remote and local.secret:
        current = remote[local.id]
        if (current["url"] != url or sorted(current["enabled_events"]) != sorted(WEBHOOK_EVENTS)
                or current.get("status") != "enabled"):
            data = stripe_client.as_dict(stripe_client.webhook_endpoint_update(
                endpoint_id=local.id, url=url, enabled_events=WEBHOOK_EVENTS))
            data["secret"] = local.secret
            WebhookEndpoint.sync_from_stripe_data(data, api_key=settings.STRIPE_SECRET_KEY)
            report.updated.append(f"webhook endpoint {local.id} {url}")
        else:
            report.existing.append(f"webhook endpoint {local.id} {url}")
        return
    # Stripe shows an endpoint's secret only when it is created: an endpoint of ours we
    # have no secret for is useless, so it is replaced.
    for endpoint in remote.values():
        if (endpoint.get("metadata") or {}).get("djstripe_uuid") == str(endpoint_uuid):
            stripe_client.webhook_endpoint_delete(endpoint["id"])
            report.updated.append(f"webhook endpoint {endpoint['id']} replaced (its secret is unknown here)")
    # The key names what this run saw, so a rerun after a crash gets the same endpoint
    # back, while a rerun after someone deleted it makes a new one.
    seen = hashlib.sha256(" ".join(sorted(remote) + [local.id if local else ""]).encode()).hexdigest()[:16]
    created = stripe_client.webhook_endpoint_create(
        url=url, enabled_events=WEBHOOK_EVENTS, metadata={"djstripe_uuid": str(endpoint_uuid)},
        idempotency_key=f"ct-setup-webhook-{endpoint_uuid}-{seen}")
    WebhookEndpoint.objects.filter(djstripe_uuid=endpoint_uuid).exclude(id=created["id"]).delete()
    WebhookEndpoint.sync_from_stripe_data(created, api_key=settings.STRIPE_SECRET_KEY)
    report.created.append(f"webhook endpoint {created['id']} {url}")
