"""Accounts, their terms, and opening periods."""
from __future__ import annotations

from datetime import datetime

from django.conf import settings
from django.contrib.auth import get_user_model
from django.db import IntegrityError, transaction
from django.db.models import BigIntegerField, F, Q, Value
from django.db.models.functions import Greatest
from django.utils import timezone

from ..errors import UnknownUser

from ..models import Account, Tier, UsagePeriod, tier_cap
from ..periods import bounds_for
from ..signals import period_closed


def account_terms(account: Account) -> tuple[int, int, object]:
    """(limit, cap, overage rate) in force for an account right now."""
    tier = account.tier
    if tier is None:
        return 0, 0, 0
    overage_allowed = tier.allow_overage and not tier.hard_limit and not account.overage_blocked
    return tier.monthly_token_limit, tier_cap(tier.monthly_token_limit, overage_allowed, tier.max_overage_percentage), tier.overage_rate


def account_for_user(*, user_id: int) -> Account:
    """The user's account, created on the default tier on first use."""
    account = Account.objects.select_related("tier").filter(user_id=user_id).first()
    if account is not None:
        return account
    if not get_user_model().objects.filter(pk=user_id).exists():
        raise UnknownUser(f"No user with id {user_id}.")
    tier = Tier.objects.filter(slug=settings.DEFAULT_TIER).first()
    try:
        with transaction.atomic():
            Account.objects.create(user_id=user_id, tier=tier)
    except IntegrityError:
        pass  # created concurrently
    return Account.objects.select_related("tier").get(user_id=user_id)


def _containing(now: datetime) -> Q:
    """The current period rule: a period holds `now` from its start (inclusive) to its end
    (exclusive); should two, the later start wins. The consume statements
    (consume/consume_single.sql, consume/batch_read.sql) write the same rule in SQL."""
    return Q(starts_at__lte=now, ends_at__gt=now)


def period_current(*, account: Account, now: datetime | None = None) -> UsagePeriod:
    """The period containing `now`, opened if it does not exist yet. A request after
    a period's end opens the next one itself; it never waits for a job."""
    now = now or timezone.now()
    period = UsagePeriod.objects.filter(_containing(now), account=account).order_by("-starts_at").first()
    if period is not None:
        return period
    start, end = bounds_for(account, now)
    limit, cap, rate = account_terms(account)
    try:
        with transaction.atomic():
            return UsagePeriod.objects.create(account=account, starts_at=start, ends_at=end, token_limit=limit,
                                              cap=cap, overage_rate=rate)
    except IntegrityError:
        return UsagePeriod.objects.get(account=account, starts_at=start)


def periods_current(*, accounts: list[Account], now: datetime) -> dict[int, UsagePeriod]:
    """period_current for many accounts (account id -> period): one query finds those that
    exist, the others are opened."""
    found: dict[int, UsagePeriod] = {}
    for period in UsagePeriod.objects.filter(_containing(now), account_id__in=[a.pk for a in accounts]) \
            .order_by("starts_at"):
        found[period.account_id] = period  # ascending: the later start wins
    return {a.pk: found.get(a.pk) or period_current(account=a, now=now) for a in accounts}


def _cap_at_least_committed(cap: int) -> Greatest:
    """A new cap for a period, never below what it has already granted (used + reserved):
    lowering a cap (a hold, a lost way to pay, a smaller tier) stops further use, it
    cannot take back tokens granted under the old one, and `used + reserved <= cap`
    stays true for every period (`reconcile` proves it)."""
    return Greatest(Value(cap), F("used") + F("reserved"), output_field=BigIntegerField())


def account_apply_terms(*, account: Account, now: datetime | None = None) -> int:
    """Rewrite the limit/cap/rate of the account's open periods from its tier and
    state, so a change takes effect at once. Returns the periods changed."""
    now = now or timezone.now()
    limit, cap, rate = account_terms(account)
    return UsagePeriod.objects.filter(account=account, ends_at__gt=now).update(
        token_limit=limit, cap=_cap_at_least_committed(cap), overage_rate=rate)


def tier_apply_terms(*, tier: Tier, now: datetime | None = None) -> int:
    """After staff edit a tier: every open period of its users gets the new terms
    (two UPDATEs, whatever the number of users)."""
    now = now or timezone.now()
    limit = tier.monthly_token_limit
    open_periods = UsagePeriod.objects.filter(account__tier=tier, ends_at__gt=now)
    full_cap = tier_cap(limit, tier.allow_overage and not tier.hard_limit, tier.max_overage_percentage)
    held = Q(account__billing_hold=True) | Q(account__anomaly_hold=True) | Q(account__can_pay=False)
    changed = open_periods.exclude(held).update(token_limit=limit, cap=_cap_at_least_committed(full_cap),
                                                overage_rate=tier.overage_rate)
    changed += open_periods.filter(held).update(token_limit=limit, cap=_cap_at_least_committed(limit),
                                                overage_rate=tier.overage_rate)
    return changed


def period_align(*, account: Account, starts_at: datetime, ends_at: datetime) -> UsagePeriod:
    """Make [starts_at, ends_at) the account's period (billing calls this with the
    Stripe subscription's current period). A period with that start is kept (its
    end follows Stripe); otherwise the overlapping open period is cut short at
    `starts_at` and a new one starts at zero: the period reset. History stays.
    A period that began inside the new one (opened before the webhook arrived)
    is re-dated to it rather than left overlapping."""
    limit, cap, rate = account_terms(account)
    with transaction.atomic():
        existing = UsagePeriod.objects.select_for_update().filter(account=account, starts_at=starts_at).first()
        if existing is not None:
            if existing.ends_at != ends_at:
                existing.ends_at = ends_at
                existing.save(update_fields=["ends_at", "updated_at"])
            return existing
        now = timezone.now()
        for old in UsagePeriod.objects.select_for_update().filter(account=account, ends_at__gt=starts_at,
                                                                   starts_at__lt=starts_at):
            was_open = old.closed_at is None
            old.ends_at = starts_at
            old.closed_at = old.closed_at or now
            old.save(update_fields=["ends_at", "closed_at", "updated_at"])
            if was_open:
                period_closed.send(sender=UsagePeriod, period=old)
        # A period opened on its own (a calendar month) after Stripe's start already
        # holds this period's usage: it becomes Stripe's period, usage and all.
        later = (UsagePeriod.objects.select_for_update()
                 .filter(account=account, starts_at__gt=starts_at, starts_at__lt=ends_at).order_by("starts_at").first())
        if later is not None:
            later.starts_at, later.ends_at = starts_at, ends_at
            later.save(update_fields=["starts_at", "ends_at", "updated_at"])
            return later
        return UsagePeriod.objects.create(account=account, starts_at=starts_at, ends_at=ends_at, token_limit=limit,
                                          cap=cap, overage_rate=rate)
