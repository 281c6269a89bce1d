"""Tiers, accounts, usage periods and the token ledger.

The ledger (`LedgerEntry`) is the truth: append-only, one row per change to a
balance. A `UsagePeriod`'s `used`/`reserved` counters are a cache of that ledger,
changed in the same transaction as the row that explains them, and `reconcile`
proves the two agree.
"""
from __future__ import annotations

import uuid
from decimal import Decimal

from django.conf import settings
from django.db import models
from django.db.models import Q


class Tier(models.Model):
    slug = models.SlugField(max_length=40, unique=True)
    name = models.CharField(max_length=100)
    monthly_token_limit = models.PositiveIntegerField()
    overage_rate = models.DecimalField(max_digits=12, decimal_places=6, help_text="USD per token past the limit.")
    allow_overage = models.BooleanField(default=True)
    max_overage_percentage = models.PositiveIntegerField(default=0, help_text="How far past the limit a period may go, in % of the limit.")
    hard_limit = models.BooleanField(default=False, help_text="Never allow usage past the limit, whatever the overage settings say.")
    requests_per_hour = models.PositiveIntegerField(default=100)
    features = models.JSONField(default=list, blank=True)
    monthly_price_cents = models.PositiveIntegerField(default=0)
    yearly_price_cents = models.PositiveIntegerField(default=0)
    # Optional: bill overage early once the accrued charge passes this many cents.
    overage_billing_threshold_cents = models.PositiveIntegerField(null=True, blank=True)

    class Meta:
        ordering = ["monthly_token_limit"]

    def __str__(self) -> str:
        return self.name

    @property
    def cap(self) -> int:
        return tier_cap(self.monthly_token_limit, self.allow_overage and not self.hard_limit, self.max_overage_percentage)


def tier_cap(limit: int, overage_allowed: bool, max_overage_percentage: int) -> int:
    """The most a period may use: the limit, or limit x (1 + max overage %)."""
    if not overage_allowed:
        return limit
    return limit + (limit * max_overage_percentage) // 100


class OperationType(models.Model):
    slug = models.SlugField(max_length=40, unique=True)
    name = models.CharField(max_length=100)
    base_tokens = models.PositiveIntegerField()
    active = models.BooleanField(default=True)

    class Meta:
        ordering = ["slug"]

    def __str__(self) -> str:
        return self.slug


class Provider(models.Model):
    """An AI provider and how to estimate its tokens.

    `openai` counts exactly with tiktoken. Others count with a tiktoken encoding
    times a factor learnt per model and script class (`Calibration`) from the
    actual tokens reported when operations settle; until one is learnt, the
    staff-set `calibration_factor`.
    """

    class Counting(models.TextChoices):
        EXACT = "exact", "Exact (tiktoken)"
        CALIBRATED = "calibrated", "Calibrated (tiktoken × learnt factor)"

    slug = models.SlugField(max_length=40, unique=True)
    name = models.CharField(max_length=100)
    counting = models.CharField(max_length=20, choices=Counting.choices, default=Counting.CALIBRATED)
    default_encoding = models.CharField(max_length=40, default="cl100k_base")
    calibration_factor = models.DecimalField(
        max_digits=8, decimal_places=5, default=Decimal("1"), verbose_name="starting factor",
        help_text="Tokens per tiktoken token, applied until a calibration has been learnt from settled operations.")
    active = models.BooleanField(default=True)

    class Meta:
        ordering = ["slug"]

    def __str__(self) -> str:
        return self.slug


class Calibration(models.Model):
    """How far a calibrated provider's real token counts are from its tiktoken base,
    learnt from settled operations, per model ('' = any model) and script class
    ('' = any script; see metering/estimation.py).

    Only `calibration_learn_run` writes these, off the consume path; every write
    bumps `version`, which is part of the estimate cache's key, so a new figure is
    used at once. `log_factor` and `deviation` are the learning's own state
    (estimation.LearnState); `factor` is what estimates apply."""

    provider = models.CharField(max_length=40)
    model = models.CharField(max_length=100, blank=True, default="")
    script_class = models.CharField(max_length=12, blank=True, default="")
    factor = models.DecimalField(max_digits=9, decimal_places=5)
    log_factor = models.FloatField()
    deviation = models.FloatField()
    samples = models.PositiveIntegerField(default=0)
    # Mean absolute relative error of recent estimates (0.1 = 10%), for staff to watch.
    recent_error = models.DecimalField(max_digits=8, decimal_places=5, null=True, blank=True)
    version = models.PositiveIntegerField(default=1)
    updated_at = models.DateTimeField()

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["provider", "model", "script_class"], name="calibration_one_per_group"),
        ]
        ordering = ["provider", "model", "script_class"]

    def __str__(self) -> str:
        return f"{self.provider} {self.model or '*'} {self.script_class or '*'} ×{self.factor}"


class CalibrationCursor(models.Model):
    """How far calibration has read the ledger (one row, id=1): the last ledger id
    learnt from. Moved in the same transaction as the calibrations it fed, so a run
    that crashed learnt nothing and the next one reads the same rows again."""

    ledger_id = models.BigIntegerField(default=0)
    ran_at = models.DateTimeField(null=True, blank=True)

    def __str__(self) -> str:
        return f"calibrated from the ledger up to #{self.ledger_id}"


class ServiceKey(models.Model):
    """A backend service's API key. Only a SHA-256 of the key is stored."""

    class Scope(models.TextChoices):
        READ = "read", "Read"
        CONSUME = "consume", "Read and consume"

    name = models.CharField(max_length=100)
    prefix = models.CharField(max_length=16, db_index=True)
    hashed_key = models.CharField(max_length=64, unique=True)
    scope = models.CharField(max_length=10, choices=Scope.choices, default=Scope.CONSUME)
    environment = models.CharField(max_length=40)
    created_at = models.DateTimeField(auto_now_add=True)
    revoked_at = models.DateTimeField(null=True, blank=True)
    last_used_at = models.DateTimeField(null=True, blank=True)
    requests_per_hour = models.PositiveIntegerField(default=100_000)

    def __str__(self) -> str:
        return f"{self.name} ({self.prefix}…)"

    @property
    def is_active(self) -> bool:
        return self.revoked_at is None


class Account(models.Model):
    class Status(models.TextChoices):
        ACTIVE = "active", "Active"
        TRIALING = "trialing", "Trialing"
        PAST_DUE = "past_due", "Past due"
        CANCELED = "canceled", "Canceled"

    user = models.OneToOneField(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="token_account")
    tier = models.ForeignKey(Tier, on_delete=models.PROTECT, null=True, blank=True, related_name="accounts")
    status = models.CharField(max_length=20, choices=Status.choices, default=Status.ACTIVE)
    # Either hold keeps the account to its included tokens (no overage). Two flags,
    # because they are lifted by different events: a successful payment, or support
    # resolving an anomaly flag.
    billing_hold = models.BooleanField(default=False, help_text="Payment failed past the grace period.")
    anomaly_hold = models.BooleanField(default=False, help_text="Held by an open anomaly flag.")
    # Set by billing: a live subscription or a default payment method on the Stripe
    # customer. Overage is only granted where it can be invoiced.
    can_pay = models.BooleanField(default=False, help_text="Billing can invoice this account's overage (a live "
                                  "subscription or a payment method on file). Without it the cap is the limit.")
    created_at = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        return f"{self.user} on {self.tier or 'no tier'}"

    @property
    def overage_blocked(self) -> bool:
        return self.billing_hold or self.anomaly_hold or not self.can_pay


class UsagePeriod(models.Model):
    """One billing period of one account: [starts_at, ends_at).

    `token_limit` and `cap` are the terms in force, copied from the tier and the
    account's state so the hot path needs no join; changing a tier rewrites them
    for open periods at once. A reset opens a new period; nothing is deleted.
    """

    # period_unique_start leads with the account: no separate index to update.
    account = models.ForeignKey(Account, on_delete=models.CASCADE, related_name="periods", db_index=False)
    starts_at = models.DateTimeField()
    ends_at = models.DateTimeField()
    token_limit = models.PositiveIntegerField()
    cap = models.PositiveIntegerField()
    overage_rate = models.DecimalField(max_digits=12, decimal_places=6)
    used = models.BigIntegerField(default=0)
    reserved = models.BigIntegerField(default=0)
    closed_at = models.DateTimeField(null=True, blank=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["account", "starts_at"], name="period_unique_start"),
            models.CheckConstraint(condition=Q(ends_at__gt=models.F("starts_at")), name="period_positive_length"),
            models.CheckConstraint(condition=Q(reserved__gte=0), name="period_reserved_nonnegative"),
        ]
        indexes = [models.Index(fields=["account", "-starts_at"], name="period_account_recent")]
        ordering = ["-starts_at"]

    def __str__(self) -> str:
        return f"{self.account.user} {self.starts_at:%Y-%m-%d}–{self.ends_at:%Y-%m-%d}"

    @property
    def overage_tokens(self) -> int:
        return max(0, self.used - self.token_limit)


class LedgerEntry(models.Model):
    """Append-only: every change to a period's counters, with why and by whom."""

    class Kind(models.TextChoices):
        CONSUMPTION = "consumption", "Consumption"
        RESERVATION = "reservation", "Reservation"
        RELEASE = "release", "Release"
        GRANT = "grant", "Grant"
        ADJUSTMENT = "adjustment", "Adjustment"
        RESET = "reset", "Reset"

    # No single-column indexes: ledger_account_recent and ledger_period_kind lead with
    # these columns, and every index is one more write on the consume path.
    # Foreign keys checked by PostgreSQL on every row cost a lookup and a row lock each (the
    # period's alone was a large share of a 1,000-row ledger insert, made while the batch holds its
    # periods' locks; bench/README.md), so none of these is: every writer takes `period` from
    # the period row it has just locked and updated in the same transaction, and `account`
    # from that row too; `manage.py reconcile` reports a row whose period is missing or
    # belongs to another account. Periods are history, never deleted, and service keys are
    # revoked, never deleted. Django still applies on_delete (PROTECT) to all of them.
    account = models.ForeignKey(Account, on_delete=models.PROTECT, related_name="ledger", db_index=False,
                                db_constraint=False)
    period = models.ForeignKey(UsagePeriod, on_delete=models.PROTECT, related_name="ledger", db_index=False,
                               db_constraint=False)
    kind = models.CharField(max_length=20, choices=Kind.choices)
    # Change to period.used and period.reserved made by this row.
    used_delta = models.BigIntegerField(default=0)
    reserved_delta = models.BigIntegerField(default=0)
    operation_id = models.CharField(max_length=200, blank=True, default="")
    operation_type = models.CharField(max_length=40, blank=True, default="")
    provider = models.CharField(max_length=40, blank=True, default="")
    model = models.CharField(max_length=100, blank=True, default="")
    estimated_tokens = models.PositiveIntegerField(null=True, blank=True)
    actual_tokens = models.PositiveIntegerField(null=True, blank=True)
    # The content's script class as the estimate reported it (the consume's optional
    # scriptClass), for calibration. A database default, so the raw writers that do
    # not name it need not change.
    script_class = models.CharField(max_length=12, blank=True, default="", db_default="")
    # Most rows have no reservation: ledger_reservation holds only those that do. No
    # query filters the ledger by service key (keys are revoked, never deleted): no index.
    reservation = models.ForeignKey("Reservation", on_delete=models.PROTECT, null=True, blank=True, related_name="+",
                                    db_index=False)
    service_key = models.ForeignKey(ServiceKey, on_delete=models.PROTECT, null=True, blank=True, related_name="+",
                                    db_index=False, db_constraint=False)
    actor = models.CharField(max_length=150, blank=True, default="", help_text="Staff member for grants and adjustments.")
    reason = models.TextField(blank=True, default="")
    # For consumptions: a hash of the request, to tell a replay from a conflicting reuse
    # of the operation id, and the answer given, so a replay answers the same.
    fingerprint = models.CharField(max_length=64, blank=True, default="")
    response = models.JSONField(null=True, blank=True)
    created_at = models.DateTimeField(db_index=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["account", "operation_id"],
                condition=Q(kind="consumption"),
                name="ledger_one_consumption_per_operation",
            ),
        ]
        indexes = [
            models.Index(fields=["account", "-created_at", "-id"], name="ledger_account_recent"),
            models.Index(fields=["period", "kind"], name="ledger_period_kind"),
            models.Index(fields=["reservation"], condition=Q(reservation__isnull=False), name="ledger_reservation"),
        ]
        ordering = ["-created_at", "-id"]
        verbose_name_plural = "ledger entries"

    def __str__(self) -> str:
        return f"{self.kind} {self.used_delta:+d} ({self.operation_id or self.reason})"


class Reservation(models.Model):
    """A hold on tokens before an operation runs; counts against the cap until
    settled by a consume, released, or expired by cleanup."""

    class Status(models.TextChoices):
        HELD = "held", "Held"
        SETTLED = "settled", "Settled"
        RELEASED = "released", "Released"
        EXPIRED = "expired", "Expired"

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    account = models.ForeignKey(Account, on_delete=models.CASCADE, related_name="reservations")
    period = models.ForeignKey(UsagePeriod, on_delete=models.PROTECT, related_name="reservations")
    tokens = models.PositiveIntegerField()
    operation_id = models.CharField(max_length=200, blank=True, default="")
    operation_type = models.CharField(max_length=40, blank=True, default="")
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.HELD)
    created_at = models.DateTimeField()
    expires_at = models.DateTimeField()
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        indexes = [
            models.Index(fields=["status", "expires_at"], name="reservation_status_expiry"),
            # The live holds of a period: what check, consume and usage subtract once a hold has expired.
            models.Index(fields=["period", "expires_at"], condition=Q(status="held"), name="reservation_period_held"),
        ]
        constraints = [
            # One live hold per operation: a retried reserve gets the same hold back.
            models.UniqueConstraint(fields=["account", "operation_id"],
                                    condition=Q(status="held") & ~Q(operation_id=""),
                                    name="reservation_one_hold_per_operation"),
        ]

    def __str__(self) -> str:
        return f"{self.tokens} tokens ({self.status})"


class AuditLog(models.Model):
    """Who asked for what, and what we answered; refused requests included."""

    # audit_user_recent leads with user: no separate index. No database-checked foreign keys
    # (one row per token request; writers take the ids from rows they just read); Django still
    # sets them to NULL when a user or key is deleted through it.
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, blank=True,
                             related_name="+", db_index=False, db_constraint=False)
    action = models.CharField(max_length=40)
    tokens = models.BigIntegerField(null=True, blank=True)
    operation_type = models.CharField(max_length=40, blank=True, default="")
    operation_id = models.CharField(max_length=200, blank=True, default="")
    result = models.CharField(max_length=60)
    client_ip = models.GenericIPAddressField(null=True, blank=True)
    user_agent = models.CharField(max_length=300, blank=True, default="")
    # No query filters audit rows by service key (keys are revoked, never deleted): no index.
    service_key = models.ForeignKey(ServiceKey, on_delete=models.SET_NULL, null=True, blank=True, related_name="+",
                                    db_index=False, db_constraint=False)
    actor = models.CharField(max_length=150, blank=True, default="")
    request_id = models.CharField(max_length=64, blank=True, default="")
    detail = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(db_index=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        indexes = [models.Index(fields=["user", "-created_at"], name="audit_user_recent")]

    def __str__(self) -> str:
        return f"{self.action} {self.result}"


class DailyUsage(models.Model):
    """The ledger summed per account, period, UTC day, kind, operation type,
    provider and model, so the dashboard and analytics read a few hundred rows
    whatever the length of a user's history.

    Built from the ledger by a job (`ledger_rollup_refresh`), never on the consume
    path; rows past the rollup watermark are added live by the selectors, and
    `ledger_rollup_verify` proves these sums equal the ledger's."""

    account = models.ForeignKey(Account, on_delete=models.CASCADE, related_name="+")
    period = models.ForeignKey(UsagePeriod, on_delete=models.CASCADE, related_name="+")
    day = models.DateField()
    kind = models.CharField(max_length=20, choices=LedgerEntry.Kind.choices)
    operation_type = models.CharField(max_length=40, blank=True, default="")
    provider = models.CharField(max_length=40, blank=True, default="")
    model = models.CharField(max_length=100, blank=True, default="")
    used_delta = models.BigIntegerField(default=0)
    reserved_delta = models.BigIntegerField(default=0)
    entries = models.BigIntegerField(default=0)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["account", "period", "day", "kind", "operation_type", "provider", "model"],
                                    name="daily_usage_one_row_per_group"),
        ]
        indexes = [
            models.Index(fields=["account", "day"], name="daily_usage_account_day"),
            models.Index(fields=["period", "day"], name="daily_usage_period_day"),
            models.Index(fields=["day"], name="daily_usage_day"),
        ]
        verbose_name_plural = "daily usage"

    def __str__(self) -> str:
        return f"{self.day} {self.kind} {self.operation_type} {self.used_delta:+d}"


class LedgerRollupState(models.Model):
    """How far `DailyUsage` has read the ledger (one row, id=1).

    Ledger ids are taken when a row is inserted but become visible when its
    transaction commits, so a lower id can appear after a higher one. Every id at
    or below `watermark_id` was either rolled up or, if it was not visible yet, is
    listed in `pending_ids` ({id: first seen missing, ISO time}) and looked for
    again on the next run; ids still missing after `ROLLUP_PENDING_SECONDS` are
    sequence values of rolled-back transactions. `refreshed_at` is when a run last
    caught up with every visible row (NULL while a backlog is being worked off):
    readers look for unrolled rows from a little before it."""

    watermark_id = models.BigIntegerField(default=0)
    pending_ids = models.JSONField(default=dict, blank=True)
    refreshed_at = models.DateTimeField(null=True, blank=True)
    verified_at = models.DateTimeField(null=True, blank=True)

    def __str__(self) -> str:
        return f"ledger rolled up to #{self.watermark_id}"
