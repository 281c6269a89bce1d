"""Billing's business rules: Stripe subscriptions drive the account's tier, status
and usage period; a period's overage goes back to Stripe as one invoice item.

Webhook receivers, views, tasks, admin and `setup_stripe` call these. Each one
owns its transactions; Stripe is only called outside them (through
`stripe_client`), except for the reads dj-stripe itself makes while it
processes a webhook.
"""
from .checkout import billing_account_get_or_create, checkout_session_create, customer_ensure, portal_session_create
from .common import (
    CURRENCY,
    WEBHOOK_EVENTS,
    AlreadySubscribed,
    PriceNotSetUp,
    SubscriptionState,
    UnknownTier,
    add_months,
    overage_cents,
)
from .overage import (
    overage_bill_ended_periods,
    overage_bill_thresholds,
    overage_invoice_period,
    overage_invoice_push,
)
from .payments import billing_holds_apply, invoice_payment_failed, invoice_payment_succeeded, invoice_upcoming
from .retention import webhook_payloads_prune
from .setup import SetupReport, stripe_setup, webhook_endpoint_url, webhook_trigger_retry
from .subscriptions import (
    customer_payment_apply,
    subscription_apply,
    subscription_period_bounds,
    subscription_refresh,
    subscriptions_expire,
)

__all__ = [
    "CURRENCY", "WEBHOOK_EVENTS", "AlreadySubscribed", "PriceNotSetUp", "SetupReport", "SubscriptionState",
    "UnknownTier", "add_months", "billing_account_get_or_create", "billing_holds_apply", "checkout_session_create",
    "customer_ensure", "customer_payment_apply", "invoice_payment_failed", "invoice_payment_succeeded", "invoice_upcoming",
    "overage_bill_ended_periods", "overage_bill_thresholds", "overage_cents", "overage_invoice_period",
    "overage_invoice_push", "portal_session_create", "stripe_setup", "subscription_apply",
    "subscription_period_bounds", "subscription_refresh", "subscriptions_expire", "webhook_endpoint_url",
    "webhook_payloads_prune", "webhook_trigger_retry",
]
