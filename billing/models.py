"""Billing state kept beside metering: which Stripe customer and subscription an
account follows, which Stripe prices stand for which tier, and the overage we
invoiced for each usage period.

Metering owns the account's tier, status and periods; billing only changes them
through metering's services. Stripe objects themselves live in dj-stripe's
models (synced from Stripe); these rows keep what *we* decided from them.
"""
from __future__ import annotations

from django.db import models
from django.db.models import Q

from metering.models import Account, Tier, UsagePeriod


class TierPrice(models.Model):
    """A Stripe Price that buys a tier. `setup_stripe` creates one per tier and
    interval (lookup key `<tier>_<interval>`); rows for prices replaced later stay,
    so subscribers on an old price still map to their tier."""

    class Interval(models.TextChoices):
        MONTH = "month", "Monthly"
        YEAR = "year", "Yearly"

    tier = models.ForeignKey(Tier, on_delete=models.PROTECT, related_name="stripe_prices")
    interval = models.CharField(max_length=5, choices=Interval.choices)
    lookup_key = models.CharField(max_length=80)
    stripe_price_id = models.CharField(max_length=255, unique=True)
    unit_amount_cents = models.PositiveIntegerField()
    active = models.BooleanField(default=True, help_text="The price checkout uses for this tier and interval.")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["tier", "interval"], condition=Q(active=True),
                                    name="tierprice_one_active_per_interval"),
        ]
        ordering = ["tier__monthly_token_limit", "interval"]

    def __str__(self) -> str:
        return f"{self.lookup_key} ({self.stripe_price_id})"


class BillingAccount(models.Model):
    """The link between a metering account and its Stripe customer and
    subscription, with what we last applied from Stripe.

    `current_period_start` only moves forward: a webhook whose (re-fetched)
    subscription shows an older period than this is stale and changes nothing.
    """

    account = models.OneToOneField(Account, on_delete=models.CASCADE, related_name="billing")
    stripe_customer_id = models.CharField(max_length=255, unique=True, null=True, blank=True)
    stripe_subscription_id = models.CharField(max_length=255, blank=True, default="", db_index=True)
    stripe_price_id = models.CharField(max_length=255, blank=True, default="")
    subscription_status = models.CharField(max_length=30, blank=True, default="")
    current_period_start = models.DateTimeField(null=True, blank=True)
    current_period_end = models.DateTimeField(null=True, blank=True)
    interval = models.CharField(max_length=5, blank=True, default="", help_text="month or year")
    cancel_at_period_end = models.BooleanField(default=False)
    # A downgrade waits for the next period; this is the tier it will bring.
    pending_tier = models.ForeignKey(Tier, on_delete=models.SET_NULL, null=True, blank=True, related_name="+")
    # Set when the subscription is deleted: access ends here.
    paid_through = models.DateTimeField(null=True, blank=True)
    access_ended_at = models.DateTimeField(null=True, blank=True)
    # First failed payment not yet followed by a successful one (the grace clock).
    payment_failed_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    def __str__(self) -> str:
        return f"{self.account.user} · {self.stripe_customer_id or 'no customer'}"

    # Subscription statuses under which Stripe still charges the customer.
    LIVE_STATUSES = ("active", "trialing", "past_due")

    @property
    def has_subscription(self) -> bool:
        return bool(self.stripe_subscription_id)

    @property
    def subscription_live(self) -> bool:
        return self.subscription_status in self.LIVE_STATUSES and self.access_ended_at is None


class SubscriptionPeriod(models.Model):
    """A usage period that followed a Stripe subscription, so Stripe bills its overage.
    Calendar-month periods (before a subscription, or after its paid end) have none."""

    period = models.OneToOneField(UsagePeriod, on_delete=models.CASCADE, related_name="subscription_link")
    billing_account = models.ForeignKey(BillingAccount, on_delete=models.CASCADE, related_name="periods")
    stripe_subscription_id = models.CharField(max_length=255)
    created_at = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        return f"{self.period} ← {self.stripe_subscription_id}"


class OverageInvoice(models.Model):
    """One Stripe invoice item for overage of one usage period.

    `through_tokens` is a cursor: the period's overage tokens billed up to and
    including this item. The amount is round_half_up(through × rate) minus what
    earlier items of the period already billed, so the period is rounded once
    however many items (early billing past a threshold) it took. The idempotency
    key is derived from the period and the cursor, and the row is committed as
    STARTED before Stripe is called: a crash between Stripe's answer and our
    commit is resumed with the same key, and Stripe answers with the same item.
    """

    class State(models.TextChoices):
        STARTED = "started", "Started (Stripe call in flight or crashed)"
        CREATED = "created", "Invoice item created"
        PAID = "paid", "Paid"
        FAILED = "failed", "Payment failed"

    period = models.ForeignKey(UsagePeriod, on_delete=models.PROTECT, related_name="overage_invoices")
    billing_account = models.ForeignKey(BillingAccount, on_delete=models.PROTECT, related_name="overage_invoices")
    through_tokens = models.BigIntegerField()
    tokens = models.BigIntegerField()
    rate = models.DecimalField(max_digits=12, decimal_places=6)
    amount_cents = models.PositiveIntegerField()
    currency = models.CharField(max_length=3, default="usd")
    idempotency_key = models.CharField(max_length=120, unique=True)
    state = models.CharField(max_length=10, choices=State.choices, default=State.STARTED, db_index=True)
    reason = models.CharField(max_length=20, default="period_end",
                              help_text="period_end, upcoming_invoice or threshold.")
    # The exact parameters sent to Stripe, so a resumed call repeats them verbatim
    # (Stripe refuses an idempotency key reused with different parameters).
    stripe_params = models.JSONField(default=dict)
    stripe_invoice_item_id = models.CharField(max_length=255, blank=True, default="")
    stripe_invoice_id = models.CharField(max_length=255, blank=True, default="")
    attempts = models.PositiveIntegerField(default=0)
    last_error = models.TextField(blank=True, default="")
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["period", "through_tokens"], name="overage_one_item_per_cursor"),
            models.CheckConstraint(condition=Q(tokens__gt=0), name="overage_tokens_positive"),
        ]
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"{self.tokens} tokens · {self.amount_cents}¢ · {self.state}"


class PlanChange(models.Model):
    """Support moving a subscriber to another tier, done by changing the Stripe
    subscription's price (never the account's tier behind Stripe's back).

    The row is committed as STARTED before Stripe is called and the idempotency key
    derives from its id, so a crash or retry repeats the same request (the exact
    `stripe_params`) and Stripe answers it once. SENT: Stripe changed the price and
    we applied the subscription it returned; CONFIRMED: a webhook brought a state of
    the subscription with this price; FAILED: Stripe refused it (nothing changed).
    """

    class State(models.TextChoices):
        STARTED = "started", "Started (Stripe call in flight or crashed)"
        SENT = "sent", "Sent (Stripe changed the price)"
        CONFIRMED = "confirmed", "Confirmed by Stripe's webhook"
        FAILED = "failed", "Failed (Stripe refused; nothing changed)"

    account = models.ForeignKey(Account, on_delete=models.CASCADE, related_name="plan_changes")
    billing_account = models.ForeignKey(BillingAccount, on_delete=models.CASCADE, related_name="plan_changes")
    stripe_subscription_id = models.CharField(max_length=255)
    stripe_item_id = models.CharField(max_length=255)
    from_tier = models.ForeignKey(Tier, on_delete=models.PROTECT, null=True, blank=True, related_name="+")
    from_price_id = models.CharField(max_length=255, blank=True, default="")
    to_tier = models.ForeignKey(Tier, on_delete=models.PROTECT, related_name="+")
    price = models.ForeignKey(TierPrice, on_delete=models.PROTECT, related_name="plan_changes")
    proration_behavior = models.CharField(max_length=20)
    reason = models.TextField()
    requested_by = models.CharField(max_length=150)
    state = models.CharField(max_length=10, choices=State.choices, default=State.STARTED, db_index=True)
    # The exact parameters sent to Stripe: a resumed call repeats them verbatim (Stripe
    # refuses an idempotency key reused with other parameters).
    stripe_params = models.JSONField(default=dict)
    stripe_invoice_id = models.CharField(max_length=255, blank=True, default="",
                                         help_text="The subscription's latest invoice after the change (the "
                                                   "prorated difference, for an upgrade).")
    attempts = models.PositiveIntegerField(default=0)
    last_error = models.TextField(blank=True, default="")
    created_at = models.DateTimeField(auto_now_add=True)
    sent_at = models.DateTimeField(null=True, blank=True)
    confirmed_at = models.DateTimeField(null=True, blank=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        constraints = [
            # One unfinished change per account: a second request while one is in flight
            # would race it on Stripe.
            models.UniqueConstraint(fields=["account"], condition=Q(state="started"),
                                    name="planchange_one_started_per_account"),
            models.CheckConstraint(condition=~Q(reason=""), name="planchange_reason_required"),
        ]
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"{self.stripe_subscription_id}: {self.from_tier or '–'} → {self.to_tier} · {self.state}"

    @property
    def idempotency_key(self) -> str:
        return f"ct-plan-change-{self.pk}"


class TierComp(models.Model):
    """A tier granted without billing: an explicit override with a reason and an end.

    While a comp is in force (not ended, starts_at ≤ now < ends_at) the account's
    tier is the comp's whatever the subscription's webhooks say; Stripe is not
    changed. When it ends (on its date, by the periodic job, or ended early by
    support) the account returns to what its subscription pays for, or to the
    DEFAULT_TIER without one.
    """

    account = models.ForeignKey(Account, on_delete=models.CASCADE, related_name="comps")
    tier = models.ForeignKey(Tier, on_delete=models.PROTECT, related_name="+")
    reason = models.TextField()
    starts_at = models.DateTimeField()
    ends_at = models.DateTimeField()
    created_by = models.CharField(max_length=150)
    created_at = models.DateTimeField(auto_now_add=True)
    ended_at = models.DateTimeField(null=True, blank=True)
    ended_by = models.CharField(max_length=150, blank=True, default="")
    end_reason = models.TextField(blank=True, default="")

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["account"], condition=Q(ended_at__isnull=True),
                                    name="tiercomp_one_open_per_account"),
            models.CheckConstraint(condition=Q(ends_at__gt=models.F("starts_at")), name="tiercomp_ends_after_start"),
            models.CheckConstraint(condition=~Q(reason=""), name="tiercomp_reason_required"),
        ]
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"{self.tier} comp until {self.ends_at:%Y-%m-%d %H:%M} UTC"
