"""Customers, Checkout and the billing portal."""
from __future__ import annotations

from datetime import datetime
from typing import Any

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from consensus_tokens.errors import ApplicationError
from metering.models import Account, Tier
from metering.services import account_for_user

from .. import stripe_client
from ..models import BillingAccount
from ..selectors import tier_price_active
from .common import INTERVALS, AlreadySubscribed, PriceNotSetUp, UnknownTier, time_bucket


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
        idempotency_key=f"ct-checkout-{billing.account_id}-{price.stripe_price_id}-{time_bucket(now, 600)}")
    return str(session["url"])


def portal_session_create(*, user: Any, now: datetime | None = None) -> str:
    now = now or timezone.now()
    stripe_client.require_configured()
    billing = customer_ensure(user=user)
    session = stripe_client.portal_session_create(
        customer_id=billing.stripe_customer_id or "", return_url=f"{settings.SITE_URL}/dashboard/",
        idempotency_key=f"ct-portal-{billing.account_id}-{time_bucket(now, 60)}")
    return str(session["url"])
