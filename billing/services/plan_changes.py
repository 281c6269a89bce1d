"""Support's plan changes go through Stripe: the subscription's price changes, and the
account follows the subscription as it always does (subscription_apply).

The change is a `PlanChange` row committed as STARTED before Stripe is called, with
the exact parameters and an idempotency key from its id: a crash after Stripe's answer
is resumed (`plan_change_send`, by support repeating the request or by the periodic
job) with the same key, and Stripe answers with the change it already made. Because
Stripe holds the new price, every later webhook (the renewal's included) carries it: a
support change can never be undone by a renewal.

Proration (`proration_for`):
- an upgrade uses `always_invoice`: Stripe prorates the rest of the period at the new
  price and invoices the difference now, and the account gets the higher tier at once;
- a downgrade uses `none`: nothing is credited, the customer keeps the tier they paid
  for until the period ends (our rule: a downgrade applies at the next period), and the
  renewal invoice is the first at the lower price.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import F
from django.utils import timezone

from consensus_tokens.errors import ApplicationError
from metering.models import Account, Tier
from metering.services import RequestContext, audit_record

from .. import stripe_client
from ..models import BillingAccount, PlanChange, TierComp, TierPrice
from ..selectors import live_subscription_for, tier_price_active, tier_price_by_stripe_id
from .common import PriceNotSetUp, SubscriptionState, stripe_id, tier_rank
from .comps import comp_in_force
from .subscriptions import subscription_apply

logger = logging.getLogger(__name__)

UPGRADE_PRORATION = "always_invoice"
DOWNGRADE_PRORATION = "none"


class NoLiveSubscription(ApplicationError):
    status, code = 409, "no_live_subscription"


class PlanChangeInProgress(ApplicationError):
    status, code = 409, "plan_change_in_progress"


def proration_for(*, from_tier: Tier | None, to_tier: Tier) -> str:
    return UPGRADE_PRORATION if tier_rank(to_tier) > tier_rank(from_tier) else DOWNGRADE_PRORATION


@dataclass(frozen=True)
class PlanChangePreview:
    """What a plan change would do, said before it is done (the admin's confirmation)."""

    subscription_id: str
    interval: str
    from_tier: Tier | None
    from_price: TierPrice | None
    to_tier: Tier
    to_price: TierPrice
    proration_behavior: str
    comp: TierComp | None

    @property
    def upgrade(self) -> bool:
        return self.proration_behavior == UPGRADE_PRORATION

    def describe(self) -> str:
        interval = "monthly" if self.interval == "month" else "yearly"

        def named(tier: Tier | None, price: TierPrice | None) -> str:
            amount = f" (${Decimal(price.unit_amount_cents) / 100:,.2f})" if price is not None else ""
            return f"{tier.name if tier else 'an unknown price'} {interval}{amount}"

        text = (f"Stripe subscription {self.subscription_id} moves from {named(self.from_tier, self.from_price)} "
                f"to {named(self.to_tier, self.to_price)}; ")
        if self.upgrade:
            text += f"the prorated difference is invoiced now and {self.to_tier.name} applies at once."
        else:
            text += (f"nothing is credited: the account keeps {self.from_tier.name if self.from_tier else 'its tier'} "
                     f"until the period ends, and the renewal is billed at the new price.")
        if self.comp is not None:
            text += (f" The comp of {self.comp.tier.name} stays in force until {self.comp.ends_at:%Y-%m-%d %H:%M} UTC; "
                     f"the account then follows the new price.")
        return text


def _live_billing(account: Account) -> BillingAccount:
    billing = live_subscription_for(account=account)
    if billing is None:
        raise NoLiveSubscription(
            f"{account.user} has no live Stripe subscription: a tier change can only be a comp "
            f"(granted without billing, with a reason and an end date).")
    return billing


def plan_change_preview(*, account: Account, tier: Tier, now: datetime | None = None) -> PlanChangePreview:
    """Check the change can be made and say what it would do; changes nothing, calls no one."""
    billing = _live_billing(account)
    interval = billing.interval or "month"
    to_price = tier_price_active(tier=tier, interval=interval)
    if to_price is None:
        raise PriceNotSetUp(f"No Stripe price for {tier.slug} ({interval}); run `manage.py setup_stripe`.")
    from_price = tier_price_by_stripe_id(price_id=billing.stripe_price_id)
    from_tier = from_price.tier if from_price is not None else None
    if from_price is not None and from_price.stripe_price_id == to_price.stripe_price_id:
        raise ApplicationError(f"Subscription {billing.stripe_subscription_id} already pays for {tier.name}.",
                               code="invalid_request")
    return PlanChangePreview(
        subscription_id=billing.stripe_subscription_id, interval=interval, from_tier=from_tier,
        from_price=from_price, to_tier=tier, to_price=to_price,
        proration_behavior=proration_for(from_tier=from_tier, to_tier=tier),
        comp=comp_in_force(account_id=account.pk, now=now))


def _first_item(data: dict[str, Any]) -> dict[str, Any]:
    items = (data.get("items") or {}).get("data") or []
    if not items:
        raise ApplicationError("The Stripe subscription has no item to change.", code="stripe_error")
    return items[0]


def plan_change_request(*, account: Account, tier: Tier, reason: str, actor: str) -> PlanChange:
    """Support moves a subscriber to `tier` by changing the Stripe subscription's price.

    Recorded (committed) before Stripe is called; then sent. Asking again for the same
    change while one is unfinished resends that one (same key); another change waits
    until it is finished."""
    if not reason or not reason.strip():
        raise ApplicationError("A reason is required.", code="reason_required")
    unfinished = PlanChange.objects.filter(account=account, state=PlanChange.State.STARTED).first()
    if unfinished is not None:
        if unfinished.to_tier_id != tier.pk:
            raise PlanChangeInProgress(
                f"A change to {unfinished.to_tier} is unfinished (Stripe's answer was not recorded); "
                f"ask for it again to resume it first.")
        return plan_change_send(plan_change_id=unfinished.pk)
    preview = plan_change_preview(account=account, tier=tier)
    fetched = stripe_client.subscription_retrieve(preview.subscription_id)
    if fetched is None:
        raise NoLiveSubscription(f"Subscription {preview.subscription_id} no longer exists on Stripe.")
    item = _first_item(stripe_client.as_dict(fetched))
    billing = BillingAccount.objects.get(account=account)
    try:
        with transaction.atomic():
            change = PlanChange(
                account=account, billing_account=billing, stripe_subscription_id=preview.subscription_id,
                stripe_item_id=item["id"], from_tier=preview.from_tier, from_price_id=stripe_id(item.get("price")),
                to_tier=tier, price=preview.to_price, proration_behavior=preview.proration_behavior,
                reason=reason.strip(), requested_by=actor)
            change.full_clean(exclude=["stripe_params"])  # set below: they name the row's id
            change.save()
            change.stripe_params = {
                "items": [{"id": change.stripe_item_id, "price": preview.to_price.stripe_price_id}],
                "proration_behavior": change.proration_behavior,
                "metadata": {"ct_plan_change": str(change.pk)},
            }
            change.save(update_fields=["stripe_params", "updated_at"])
            audit_record(ctx=RequestContext(actor=actor), user_id=account.user_id, action="plan_change",
                         result="requested", detail=_audit_detail(change))
    except IntegrityError:
        raise PlanChangeInProgress("Another plan change for this account was just started.") from None
    return plan_change_send(plan_change_id=change.pk)


def _audit_detail(change: PlanChange) -> dict[str, Any]:
    return {"reason": change.reason, "from": change.from_tier.slug if change.from_tier else None,
            "to": change.to_tier.slug, "price": change.price.stripe_price_id,
            "subscription": change.stripe_subscription_id, "proration": change.proration_behavior,
            "planChangeId": change.pk}


def plan_change_send(*, plan_change_id: int) -> PlanChange:
    """Send a STARTED change to Stripe (again, after a crash: same parameters, same key),
    then sync the subscription Stripe returns into dj-stripe and apply it. A refusal
    marks the change FAILED (Stripe changed nothing); an outage leaves it STARTED."""
    from djstripe.models import Subscription

    change = PlanChange.objects.select_related("account", "to_tier", "from_tier", "price").get(pk=plan_change_id)
    if change.state != PlanChange.State.STARTED:
        return change
    PlanChange.objects.filter(pk=change.pk).update(attempts=F("attempts") + 1)
    try:
        answer = stripe_client.subscription_price_change(subscription_id=change.stripe_subscription_id,
                                                         params=change.stripe_params,
                                                         idempotency_key=change.idempotency_key)
    except stripe_client.StripeError as error:
        refused = stripe_client.is_refusal(error)
        PlanChange.objects.filter(pk=change.pk, state=PlanChange.State.STARTED).update(
            state=PlanChange.State.FAILED if refused else PlanChange.State.STARTED, last_error=error.message,
            updated_at=timezone.now())
        if refused:
            audit_record(ctx=RequestContext(actor=change.requested_by), user_id=change.account.user_id,
                         action="plan_change", result="failed", detail={**_audit_detail(change),
                                                                        "error": error.message})
        raise
    data = stripe_client.as_dict(answer)
    Subscription.sync_from_stripe_data(answer, api_key=settings.STRIPE_SECRET_KEY)
    now = timezone.now()
    # A webhook may have confirmed it already (it can arrive before we get here).
    PlanChange.objects.filter(pk=change.pk, state=PlanChange.State.STARTED).update(
        state=PlanChange.State.SENT, sent_at=now, stripe_invoice_id=stripe_id(data.get("latest_invoice")),
        last_error="", updated_at=now)
    subscription_apply(subscription_id=change.stripe_subscription_id)
    audit_record(ctx=RequestContext(actor=change.requested_by), user_id=change.account.user_id,
                 action="plan_change", result="sent", detail=_audit_detail(change))
    change.refresh_from_db()
    return change


def plan_changes_confirm(*, subscription_id: str, state_data: dict[str, Any]) -> int:
    """A subscription webhook was applied: the changes it shows (its price is theirs, and
    that price is what the account now follows) are confirmed by Stripe."""
    state = SubscriptionState.from_stripe(state_data)
    billing = BillingAccount.objects.filter(stripe_subscription_id=subscription_id).first()
    if billing is None or not state.price_id or billing.stripe_price_id != state.price_id:
        return 0
    return PlanChange.objects.filter(
        stripe_subscription_id=subscription_id, price__stripe_price_id=state.price_id,
        state__in=(PlanChange.State.STARTED, PlanChange.State.SENT),
    ).update(state=PlanChange.State.CONFIRMED, confirmed_at=timezone.now(), updated_at=timezone.now())


def plan_changes_resume(*, now: datetime | None = None, older_than: timedelta = timedelta(minutes=10)) -> list[int]:
    """Periodic: send again the changes left STARTED (a crash or an outage after they were
    recorded), with their own key. Safe to run twice: Stripe answers a key once."""
    now = now or timezone.now()
    resumed = []
    for change_id in PlanChange.objects.filter(state=PlanChange.State.STARTED,
                                               created_at__lt=now - older_than).values_list("pk", flat=True):
        try:
            plan_change_send(plan_change_id=change_id)
        except ApplicationError as error:
            logger.warning("plan change %s not resumed: %s", change_id, error.message)
            continue
        resumed.append(change_id)
    return resumed
