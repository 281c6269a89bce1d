"""Reads for billing: admin, dashboard and services read through these."""
from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from django.db.models import Q, QuerySet

from metering.models import Account, Tier

from .models import BillingAccount, OverageInvoice, TierPrice


def billing_account_for(*, account: Account) -> BillingAccount | None:
    return BillingAccount.objects.filter(account=account).first()


def tier_price_active(*, tier: Tier, interval: str) -> TierPrice | None:
    return TierPrice.objects.filter(tier=tier, interval=interval, active=True).first()


def tier_price_by_stripe_id(*, price_id: str) -> TierPrice | None:
    return TierPrice.objects.select_related("tier").filter(stripe_price_id=price_id).first()


def overage_invoices(*, account: Account | None = None) -> QuerySet[OverageInvoice]:
    qs = OverageInvoice.objects.select_related("period", "billing_account__account__user")
    return qs.filter(billing_account__account=account) if account is not None else qs


def overage_invoices_needing_retry(*, now: datetime) -> QuerySet[OverageInvoice]:
    """Failed items, and started ones left over an hour: a Stripe call that crashed."""
    stuck = Q(state=OverageInvoice.State.STARTED, created_at__lt=now - timedelta(hours=1))
    return overage_invoices().filter(Q(state=OverageInvoice.State.FAILED) | stuck)


def webhook_triggers_failed(*, since: datetime) -> QuerySet[Any]:
    """Valid Stripe webhooks received since then that were not processed."""
    from djstripe.models import WebhookEventTrigger

    return WebhookEventTrigger.objects.filter(created__gte=since, valid=True, processed=False)


def billing_summary(*, account: Account) -> dict[str, Any]:
    """What the dashboard shows about the account's plan."""
    billing = billing_account_for(account=account)
    summary: dict[str, Any] = {
        "has_customer": bool(billing and billing.stripe_customer_id),
        "subscription_status": billing.subscription_status if billing else "",
        "current_period_end": billing.current_period_end if billing else None,
        "cancel_at_period_end": billing.cancel_at_period_end if billing else False,
        "pending_tier": billing.pending_tier if billing else None,
        "payment_failed_at": billing.payment_failed_at if billing else None,
        "paid_through": billing.paid_through if billing else None,
    }
    return summary
