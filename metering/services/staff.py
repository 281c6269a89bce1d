"""What support staff do to an account: every change is a ledger entry (never an
edit of one) and an audit row naming who and why."""
from __future__ import annotations

from django.db import transaction
from django.db.models import F
from django.utils import timezone

from consensus_tokens.errors import ApplicationError

from ..errors import TokenCapExceeded
from ..models import Account, LedgerEntry, Reservation, Tier, UsagePeriod
from .accounts import account_apply_terms, period_current
from .audit import audit_record
from .context import RequestContext
from .notify import notify_usage
from .usage import period_available, reservation_release


def _require_reason(reason: str) -> None:
    if not reason or not reason.strip():
        raise ApplicationError("A reason is required.", code="reason_required")


def usage_adjust(*, account: Account, tokens: int, reason: str, actor: str,
                 kind: str = LedgerEntry.Kind.ADJUSTMENT) -> LedgerEntry:
    """Correct the current period's used tokens by `tokens` (negative gives tokens
    back). A correction never takes usage below zero; a grant may (a credit). One that
    adds usage stays under the cap, as every path that grants tokens does: what passes
    it could not have been allowed, so it could not be billed."""
    _require_reason(reason)
    if tokens == 0:
        raise ApplicationError("An adjustment of zero changes nothing.", code="invalid_request")
    period = period_current(account=account)
    with transaction.atomic():
        locked = UsagePeriod.objects.select_for_update().get(pk=period.pk)
        if kind == LedgerEntry.Kind.ADJUSTMENT and locked.used + tokens < 0:
            raise ApplicationError(f"Usage is {locked.used}; it cannot go below zero.", code="invalid_request")
        if tokens > 0 and locked.used + locked.reserved + tokens > locked.cap:
            raise TokenCapExceeded(f"Usage would pass the cap of {locked.cap:,} tokens.",
                                   extra={"available": period_available(locked), "cap": locked.cap})
        before = locked.used
        UsagePeriod.objects.filter(pk=period.pk).update(used=F("used") + tokens)
        entry = LedgerEntry.objects.create(account=account, period=locked, kind=kind, used_delta=tokens,
                                           actor=actor, reason=reason, created_at=timezone.now())
        audit_record(ctx=RequestContext(actor=actor), user_id=account.user_id, action=kind, result="recorded",
                     tokens=tokens, detail={"reason": reason, "periodId": period.pk})
        if tokens > 0:
            locked.refresh_from_db()
            notify_usage(locked, before)
    return entry


def usage_grant(*, account: Account, tokens: int, reason: str, actor: str) -> LedgerEntry:
    """Bonus tokens for this period: usage goes down by `tokens`, below zero if need
    be, which leaves that much more room under the limit."""
    if tokens <= 0:
        raise ApplicationError("Grant a positive number of tokens.", code="invalid_request")
    return usage_adjust(account=account, tokens=-tokens, reason=reason, actor=actor, kind=LedgerEntry.Kind.GRANT)


def period_reset(*, account: Account, reason: str, actor: str) -> UsagePeriod:
    """Start the current period's count again from zero: a reset entry takes the
    used tokens back (history stays; holds stay held)."""
    _require_reason(reason)
    period = period_current(account=account)
    with transaction.atomic():
        locked = UsagePeriod.objects.select_for_update().get(pk=period.pk)
        if locked.used:
            LedgerEntry.objects.create(account=account, period=locked, kind=LedgerEntry.Kind.RESET,
                                       used_delta=-locked.used, actor=actor, reason=reason, created_at=timezone.now())
            UsagePeriod.objects.filter(pk=period.pk).update(used=F("used") - locked.used)
        audit_record(ctx=RequestContext(actor=actor), user_id=account.user_id, action="reset", result="recorded",
                     tokens=-locked.used, detail={"reason": reason, "periodId": period.pk})
    locked.refresh_from_db()
    return locked


def account_change_tier(*, account: Account, tier: Tier | None, actor: str, reason: str) -> Account:
    """Move an account to another tier; its current period gets the new terms at once."""
    _require_reason(reason)
    with transaction.atomic():
        old = account.tier.slug if account.tier else None
        account.tier = tier
        account.save(update_fields=["tier"])
        account_apply_terms(account=account)
        audit_record(ctx=RequestContext(actor=actor), user_id=account.user_id, action="change_tier",
                     result="recorded", detail={"from": old, "to": tier.slug if tier else None, "reason": reason})
    return account


def reservation_release_by_support(*, account: Account, reservation: Reservation, reason: str,
                                   ctx: RequestContext) -> None:
    """Free a stuck hold's tokens, audited with who and why, in one transaction."""
    _require_reason(reason)
    with transaction.atomic():
        reservation_release(user_id=account.user_id, reservation_id=str(reservation.pk), ctx=ctx)
        audit_record(ctx=ctx, user_id=account.user_id, action="support_release", result="recorded",
                     tokens=reservation.tokens, operation_id=reservation.operation_id,
                     detail={"reason": reason, "reservationId": str(reservation.pk)})
