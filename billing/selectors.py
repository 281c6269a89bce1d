"""Reads for billing: admin, dashboard and services read through these."""
from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from django.db.models import OuterRef, Q, QuerySet, Subquery

from metering.models import Account, Tier

from .models import BillingAccount, OverageInvoice, PlanChange, TierComp, TierPrice


def billing_account_for(*, account: Account) -> BillingAccount | None:
    return BillingAccount.objects.filter(account=account).first()


def live_subscription_for(*, account: Account) -> BillingAccount | None:
    """The account's billing row if its subscription is live, else None."""
    return BillingAccount.objects.filter(account=account, subscription_status__in=BillingAccount.LIVE_STATUSES,
                                         stripe_subscription_id__gt="").first()


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
        "interval": billing.interval if billing else "",
    }
    return summary


def comp_in_force_columns(*, now: datetime) -> dict[str, Any]:
    """Annotations for a queryset of accounts: the tier name, end and reason of the comp in
    force (None without one), for lists that show comps without a query per row."""
    in_force = TierComp.objects.filter(account=OuterRef("pk"), ended_at__isnull=True, starts_at__lte=now,
                                       ends_at__gt=now)
    return {"comp_tier_name": Subquery(in_force.values("tier__name")[:1]),
            "comp_ends_at": Subquery(in_force.values("ends_at")[:1]),
            "comp_reason": Subquery(in_force.values("reason")[:1])}


def plan_changes_for(*, account: Account) -> QuerySet[PlanChange]:
    return PlanChange.objects.select_related("from_tier", "to_tier", "price").filter(account=account)
