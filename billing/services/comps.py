"""Comps: a tier granted without billing, as an explicit override with a reason and an end.

While a comp is in force the account's tier is the comp's, whatever the subscription's
webhooks say (subscriptions.py asks `comp_in_force` where it decides the tier); Stripe is
never changed. When the comp ends, on its date (`comps_expire`, periodic) or early
(`comp_end`, support), the account returns to what its subscription pays for, or to the
DEFAULT_TIER without a live subscription, and its open periods take those terms.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from consensus_tokens.errors import ApplicationError
from metering.models import Account, Tier
from metering.services import RequestContext, account_apply_terms, audit_record

from ..models import BillingAccount, TierComp
from ..selectors import tier_price_by_stripe_id

SYSTEM_ACTOR = "system"


class CompExists(ApplicationError):
    status, code = 409, "comp_exists"


def _require_reason(reason: str) -> None:
    if not reason or not reason.strip():
        raise ApplicationError("A reason is required.", code="reason_required")


def comp_in_force(*, account_id: int, now: datetime | None = None) -> TierComp | None:
    """The account's comp in force at `now` (not ended, started, not past its end), if any."""
    now = now or timezone.now()
    return (TierComp.objects.select_related("tier")
            .filter(account_id=account_id, ended_at__isnull=True, starts_at__lte=now, ends_at__gt=now).first())


def tier_paid_for(*, billing: BillingAccount | None, now: datetime) -> Tier | None:
    """The tier the account has without a comp: what its subscription's price buys while
    Stripe charges for it (or a canceled one's paid time lasts), else the DEFAULT_TIER
    (the one policy for accounts that cannot pay; none when it is empty)."""
    if billing is not None and billing.stripe_price_id:
        paid_time_left = (billing.subscription_status == "canceled" and billing.access_ended_at is None
                          and billing.paid_through is not None and billing.paid_through > now)
        if billing.subscription_status in BillingAccount.LIVE_STATUSES or paid_time_left:
            price = tier_price_by_stripe_id(price_id=billing.stripe_price_id)
            if price is not None:
                return price.tier
    default = settings.DEFAULT_TIER
    return Tier.objects.filter(slug=default).first() if default else None


@dataclass(frozen=True)
class CompPreview:
    """What granting a comp would do, said before it is done (the admin's confirmation)."""

    tier: Tier
    ends_at: datetime
    reason: str
    returns_to: Tier | None
    subscription_id: str

    def describe(self) -> str:
        back = self.returns_to.name if self.returns_to else "no tier"
        paid = (f"what Stripe subscription {self.subscription_id} pays for" if self.subscription_id
                else "the default tier for accounts without a subscription")
        return (f"{self.tier.name} is granted without billing until {self.ends_at:%Y-%m-%d %H:%M} UTC "
                f"(reason: {self.reason.strip()}); Stripe is not changed; at the end the account returns to "
                f"{back} ({paid}).")


def _live_subscription_id(billing: BillingAccount | None) -> str:
    if billing is None or billing.subscription_status not in BillingAccount.LIVE_STATUSES:
        return ""
    return billing.stripe_subscription_id


def comp_preview(*, account: Account, tier: Tier, ends_at: datetime, reason: str,
                 now: datetime | None = None) -> CompPreview:
    """Check a comp can be granted and say what it would do; changes nothing."""
    now = now or timezone.now()
    _require_reason(reason)
    if ends_at <= now:
        raise ApplicationError("A comp's end must be in the future.", code="invalid_request")
    current = comp_in_force(account_id=account.pk, now=now)
    if current is not None:
        raise CompExists(f"{current} is already in force; end it first.")
    billing = BillingAccount.objects.filter(account=account).first()
    return CompPreview(tier=tier, ends_at=ends_at, reason=reason, returns_to=tier_paid_for(billing=billing, now=now),
                       subscription_id=_live_subscription_id(billing))


def comp_end_preview(*, account: Account, now: datetime | None = None) -> tuple[TierComp, str]:
    """The comp in force and what ending it now would do; changes nothing."""
    now = now or timezone.now()
    comp = comp_in_force(account_id=account.pk, now=now)
    if comp is None:
        raise ApplicationError(f"{account.user} has no comp in force.", code="no_comp")
    billing = BillingAccount.objects.filter(account=account).first()
    back = tier_paid_for(billing=billing, now=now)
    subscription_id = _live_subscription_id(billing)
    paid = (f"what Stripe subscription {subscription_id} pays for" if subscription_id
            else "the default tier for accounts without a subscription")
    return comp, (f"The comp of {comp.tier.name} (reason: {comp.reason}; until {comp.ends_at:%Y-%m-%d %H:%M} UTC) "
                  f"ends now; the account returns to {back.name if back else 'no tier'} ({paid}). "
                  f"Stripe is not changed.")


def _locked(account_id: int) -> tuple[BillingAccount | None, Account]:
    """The account's billing row then the account, locked in the order subscription_apply takes them."""
    billing = BillingAccount.objects.select_for_update().filter(account_id=account_id).first()
    account = Account.objects.select_for_update(of=("self",)).select_related("tier").get(pk=account_id)
    return billing, account


def comp_grant(*, account: Account, tier: Tier, ends_at: datetime, reason: str, actor: str,
               now: datetime | None = None) -> TierComp:
    """Grant `tier` without billing until `ends_at`: the account takes it at once (its open
    periods too), and keeps it whatever the subscription's webhooks say until it ends."""
    now = now or timezone.now()
    comp_preview(account=account, tier=tier, ends_at=ends_at, reason=reason, now=now)
    with transaction.atomic():
        _, locked = _locked(account.pk)
        # An open comp past its end that the job has not ended yet gives way to this one.
        for stale in TierComp.objects.select_for_update().filter(account=locked, ended_at__isnull=True):
            if stale.ends_at > now:
                raise CompExists(f"{stale} is already in force; end it first.")
            _close(stale, actor=SYSTEM_ACTOR, reason="ended on its date", now=now)
        comp = TierComp(account=locked, tier=tier, reason=reason.strip(), starts_at=now, ends_at=ends_at,
                        created_by=actor)
        comp.full_clean()
        comp.save()
        before = locked.tier.slug if locked.tier else None
        locked.tier = tier
        locked.save(update_fields=["tier"])
        account_apply_terms(account=locked, now=now)
        audit_record(ctx=RequestContext(actor=actor), user_id=locked.user_id, action="comp_grant", result="recorded",
                     detail={"reason": comp.reason, "from": before, "to": tier.slug, "compId": comp.pk,
                             "endsAt": ends_at.isoformat()})
    return comp


def _close(comp: TierComp, *, actor: str, reason: str, now: datetime) -> None:
    comp.ended_at = now
    comp.ended_by = actor
    comp.end_reason = reason
    comp.save(update_fields=["ended_at", "ended_by", "end_reason"])


def comp_end(*, comp_id: int, actor: str, reason: str, now: datetime | None = None) -> TierComp:
    """End a comp (support's "end comp now", or the job on its date): the account returns to
    what its subscription pays for, or to the DEFAULT_TIER, and its open periods follow.
    Ending an ended comp changes nothing."""
    now = now or timezone.now()
    _require_reason(reason)
    account_id = TierComp.objects.values_list("account_id", flat=True).get(pk=comp_id)
    with transaction.atomic():
        billing, account = _locked(account_id)
        comp = TierComp.objects.select_for_update().select_related("tier").get(pk=comp_id)
        if comp.ended_at is not None:
            return comp
        _close(comp, actor=actor, reason=reason.strip(), now=now)
        tier = tier_paid_for(billing=billing, now=now)
        if billing is not None and billing.pending_tier_id is not None:
            billing.pending_tier = None  # the comp's end already brings what the subscription pays for
            billing.save(update_fields=["pending_tier", "updated_at"])
        account.tier = tier
        account.save(update_fields=["tier"])
        account_apply_terms(account=account, now=now)
        audit_record(ctx=RequestContext(actor=actor), user_id=account.user_id, action="comp_end", result="recorded",
                     detail={"reason": comp.end_reason, "from": comp.tier.slug, "to": tier.slug if tier else None,
                             "compId": comp.pk, "endsAt": comp.ends_at.isoformat()})
    return comp


def comps_expire(*, now: datetime | None = None) -> int:
    """Periodic: end the comps whose date has come. Safe to run twice (an ended comp is skipped)."""
    now = now or timezone.now()
    ended = 0
    for comp_id in TierComp.objects.filter(ended_at__isnull=True, ends_at__lte=now).values_list("pk", flat=True):
        if comp_end(comp_id=comp_id, actor=SYSTEM_ACTOR, reason="ended on its date", now=now).ended_at == now:
            ended += 1
    return ended
