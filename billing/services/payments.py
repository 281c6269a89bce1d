"""Invoices paid, failed and upcoming; the grace period and the billing hold."""
from __future__ import annotations

import logging
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import transaction
from django.db.models import F
from django.utils import timezone

from metering.models import Account, UsagePeriod
from metering.services import account_apply_terms

from ..models import BillingAccount, OverageInvoice
from .common import stripe_id
from .overage import overage_period_on_commit
from .subscriptions import billing_account_for_customer, subscription_refresh

logger = logging.getLogger(__name__)


def _invoice_data(invoice_id: str) -> dict[str, Any] | None:
    from djstripe.models import Invoice

    row = Invoice.objects.filter(id=invoice_id).first()
    return dict(row.stripe_data) if row is not None and row.stripe_data else None


def _invoice_subscription_id(data: dict[str, Any]) -> str:
    parent = data.get("parent") or {}
    details = parent.get("subscription_details") or {}
    return stripe_id(details.get("subscription")) or stripe_id(data.get("subscription"))


def _invoice_item_ids(data: dict[str, Any]) -> list[str]:
    ids = []
    for line in (data.get("lines") or {}).get("data") or []:
        parent = line.get("parent") or {}
        details = parent.get("invoice_item_details") or {}
        item = stripe_id(details.get("invoice_item")) or stripe_id(line.get("invoice_item"))
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
    billing = billing_account_for_customer(customer_id=stripe_id(data.get("customer")))
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
    billing = billing_account_for_customer(customer_id=stripe_id(data.get("customer")))
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
        overage_period_on_commit(period_id=period_id, reason="upcoming_invoice")
    return len(ids)
