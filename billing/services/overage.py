"""A period's overage back to Stripe as invoice items, exactly once."""
from __future__ import annotations

import logging
from datetime import datetime
from decimal import Decimal

from django.db import transaction
from django.db.models import F, Max, Sum
from django.db.models.functions import Coalesce
from django.utils import timezone

from consensus_tokens.errors import ApplicationError
from metering.models import UsagePeriod

from .. import stripe_client
from ..models import BillingAccount, OverageInvoice, SubscriptionPeriod
from .common import CURRENCY, epoch, overage_cents

logger = logging.getLogger(__name__)


def overage_period_on_commit(*, period_id: int, reason: str) -> None:
    from ..tasks import overage_invoice_period_task

    transaction.on_commit(lambda: overage_invoice_period_task.delay(period_id, reason), robust=True)


def overage_bill_account_on_commit(*, account_id: int) -> None:
    from ..tasks import overage_bill_ended_periods_task

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
    subscription_id = _renewal_carries(period=period, billing=billing)
    params = {
        "customer_id": billing.stripe_customer_id,
        "amount_cents": amount,
        "currency": CURRENCY,
        "description": (f"Token overage {period.starts_at:%Y-%m-%d} to {period.ends_at:%Y-%m-%d}: "
                        f"{tokens:,} tokens at ${rate.normalize():f}/token"),
        "metadata": {"period_id": str(period.pk), "through_tokens": str(through), "account_id": str(period.account_id)},
        "period_start": epoch(period.starts_at),
        "period_end": epoch(period.ends_at),
        "subscription_id": subscription_id or None,
    }
    invoice = OverageInvoice(period=period, billing_account=billing, through_tokens=through, tokens=tokens, rate=rate,
                             amount_cents=amount, currency=CURRENCY, idempotency_key=key, reason=reason,
                             stripe_params=params)
    invoice.full_clean()
    invoice.save()
    return invoice


def _renewal_carries(*, period: UsagePeriod, billing: BillingAccount) -> str:
    """The subscription whose next renewal invoice carries the period's overage item, or ""
    when it gets an invoice of its own: a monthly subscription's renewal comes within a
    month, a yearly one's up to a year later (each month's overage is invoiced when that
    month ends), and a period outside a live subscription has no renewal to wait for."""
    if not billing.subscription_live or billing.interval != "month":
        return ""
    linked = SubscriptionPeriod.objects.filter(period=period, stripe_subscription_id=billing.stripe_subscription_id)
    return billing.stripe_subscription_id if linked.exists() else ""


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
        if billing is None or not billing.stripe_customer_id:
            return None  # no Stripe customer: no way to pay, so no overage was granted
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
    if _needs_own_invoice(invoice):
        _invoice_now(invoice=invoice)
    return invoice


def _needs_own_invoice(invoice: OverageInvoice) -> bool:
    """Early overage is invoiced now; so is overage no renewal invoice will carry soon
    (a yearly subscription's months, a period outside a live subscription)."""
    return (invoice.state == OverageInvoice.State.CREATED and not invoice.stripe_invoice_id
            and (invoice.reason == "threshold" or not invoice.stripe_params.get("subscription_id")))


def _invoice_now(*, invoice: OverageInvoice) -> None:
    """An invoice of its own for the pending item, created and finalized now (so Stripe
    charges it), each call with a key derived from the item's."""
    try:
        stripe_invoice = stripe_client.invoice_create_now(
            customer_id=invoice.stripe_params["customer_id"], description="Token overage",
            metadata={"overage_invoice_id": str(invoice.pk)}, idempotency_key=f"{invoice.idempotency_key}-invoice")
        if stripe_invoice["status"] == "draft":
            stripe_invoice = stripe_client.invoice_finalize(invoice_id=stripe_invoice["id"],
                                                            idempotency_key=f"{invoice.idempotency_key}-finalize")
    except ApplicationError:
        # The item stays pending on the customer; the next run of the job tries again.
        logger.exception("invoice for overage item %s failed", invoice.pk)
        return
    OverageInvoice.objects.filter(pk=invoice.pk, stripe_invoice_id="").update(stripe_invoice_id=stripe_invoice["id"])


def overage_bill_ended_periods(*, now: datetime | None = None, account_id: int | None = None) -> list[int]:
    """Periodic (and after each period change): bill every ended period with
    overage not billed yet, and resume unfinished items. Safe to run twice."""
    now = now or timezone.now()
    # Every period of an account with a Stripe customer: overage is only granted where it
    # can be invoiced (metering's can_pay), and every token granted is billed.
    periods = UsagePeriod.objects.filter(ends_at__lte=now, account__billing__stripe_customer_id__isnull=False)
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
    # Items whose own invoice could not be made last time (Stripe down between the two calls).
    uninvoiced = OverageInvoice.objects.filter(state=OverageInvoice.State.CREATED, stripe_invoice_id="")
    if account_id is not None:
        uninvoiced = uninvoiced.filter(period__account_id=account_id)
    for invoice in uninvoiced:
        if _needs_own_invoice(invoice):
            _invoice_now(invoice=invoice)
    return done


def overage_bill_thresholds(*, now: datetime | None = None) -> list[int]:
    """Periodic: bill open periods early once their unbilled overage charge passes the
    tier's threshold (like Stripe's billing thresholds)."""
    now = now or timezone.now()
    candidates = UsagePeriod.objects.filter(
        starts_at__lte=now, ends_at__gt=now, used__gt=F("token_limit"),
        account__tier__overage_billing_threshold_cents__isnull=False,
        account__billing__stripe_customer_id__isnull=False,
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
