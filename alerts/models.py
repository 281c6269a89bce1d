"""What we told users and staff, and what looked wrong.

`AlertEvent` is written in the same transaction that changed the usage (or by
the job that noticed the period ended), before any e-mail is attempted: a broker
or SMTP outage leaves a pending row that the periodic resend job delivers later,
and the unique constraints make "once per threshold per period" a database fact
rather than a hope.
"""
from __future__ import annotations

from django.conf import settings
from django.db import models
from django.db.models import Q


class AlertEvent(models.Model):
    class Kind(models.TextChoices):
        THRESHOLD = "threshold", "Usage threshold crossed"
        OVERAGE = "overage", "Usage entered overage"
        PERIOD_SUMMARY = "period_summary", "Period summary"
        WEEKLY_DIGEST = "weekly_digest", "Weekly digest"

    class Status(models.TextChoices):
        PENDING = "pending", "Pending"
        SENDING = "sending", "Sending"
        SENT = "sent", "Sent"
        SKIPPED = "skipped", "Skipped (unsubscribed or no address)"
        FAILED = "failed", "Failed (gave up)"

    account = models.ForeignKey("metering.Account", on_delete=models.CASCADE, related_name="alerts")
    period = models.ForeignKey("metering.UsagePeriod", on_delete=models.CASCADE, related_name="alerts")
    kind = models.CharField(max_length=20, choices=Kind.choices)
    # Percentage of the limit for THRESHOLD (75, 90, 100); 0 for the other kinds.
    threshold = models.PositiveSmallIntegerField(default=0)
    # The Sunday a weekly digest belongs to; null for the other kinds.
    week = models.DateField(null=True, blank=True)
    recipient = models.EmailField(blank=True, default="")
    # The figures when it was recorded (used, limit, ...), for support to read.
    context = models.JSONField(default=dict, blank=True)
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.PENDING)
    attempts = models.PositiveSmallIntegerField(default=0)
    last_error = models.TextField(blank=True, default="")
    created_at = models.DateTimeField()
    claimed_at = models.DateTimeField(null=True, blank=True)
    sent_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["account", "period", "kind", "threshold"],
                                    condition=~Q(kind="weekly_digest"), name="alert_once_per_period"),
            models.UniqueConstraint(fields=["account", "kind", "week"], condition=Q(kind="weekly_digest"),
                                    name="alert_digest_once_per_week"),
        ]
        indexes = [models.Index(fields=["status", "created_at"], name="alert_status_created")]
        ordering = ["-created_at", "-id"]

    def __str__(self) -> str:
        what = f"{self.threshold}%" if self.kind == self.Kind.THRESHOLD else self.get_kind_display()
        return f"{what} to {self.recipient or '(no address)'} ({self.status})"


class EmailPreference(models.Model):
    """Which usage e-mails a user wants. No row means all of them. Billing-critical
    notices (the overage notice) are not optional and have no switch here."""

    user = models.OneToOneField(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="email_preference")
    usage_alerts = models.BooleanField(default=True, help_text="75/90/100% threshold e-mails.")
    weekly_digest = models.BooleanField(default=True)
    period_summary = models.BooleanField(default=True)
    updated_at = models.DateTimeField(auto_now=True)

    def __str__(self) -> str:
        return f"e-mail preferences of {self.user}"


class AnomalyFlag(models.Model):
    """Usage that looks wrong, with the numbers that made it look so. One flag per
    account, rule and hour window, so the hourly job may run twice or late."""

    class Rule(models.TextChoices):
        SPIKE = "spike", "Usage spike (this hour vs previous 24 h average)"
        REFUSED_BURST = "refused_burst", "Burst of refused requests"

    class Status(models.TextChoices):
        OPEN = "open", "Open"
        RESOLVED = "resolved", "Resolved"

    account = models.ForeignKey("metering.Account", on_delete=models.CASCADE, related_name="anomaly_flags")
    rule = models.CharField(max_length=20, choices=Rule.choices)
    window_start = models.DateTimeField()
    window_end = models.DateTimeField()
    observed = models.BigIntegerField(help_text="Tokens (spike) or refused requests (burst) in the window.")
    baseline = models.DecimalField(max_digits=20, decimal_places=4,
                                   help_text="Average per hour over the previous 24 hours.")
    multiplier = models.PositiveIntegerField()
    minimum = models.PositiveIntegerField()
    details = models.JSONField(default=dict, blank=True)
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.OPEN)
    held = models.BooleanField(default=False, help_text="This flag put the account on an anomaly hold.")
    created_at = models.DateTimeField()
    notified_at = models.DateTimeField(null=True, blank=True)
    resolved_at = models.DateTimeField(null=True, blank=True)
    resolved_by = models.CharField(max_length=150, blank=True, default="")
    resolution_note = models.TextField(blank=True, default="")

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["account", "rule", "window_start"], name="anomaly_once_per_window"),
        ]
        indexes = [models.Index(fields=["status", "-created_at"], name="anomaly_status_recent")]
        ordering = ["-created_at", "-id"]

    def __str__(self) -> str:
        return f"{self.get_rule_display()}: {self.observed} vs {self.baseline}/h ({self.status})"
