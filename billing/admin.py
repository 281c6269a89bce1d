"""Billing's support console: overage invoices (see, retry), billing links, tier
prices, and a working retry for failed Stripe webhooks. Actions call services."""
from __future__ import annotations

from typing import Any

from django.contrib import admin, messages
from djstripe.admin.admin import WebhookEventTriggerAdmin as DjstripeWebhookEventTriggerAdmin
from djstripe.models import WebhookEventTrigger

from consensus_tokens.errors import ApplicationError

from . import services
from .models import BillingAccount, OverageInvoice, PlanChange, TierComp, TierPrice
from .services.plan_changes import plan_change_send


@admin.register(TierPrice)
class TierPriceAdmin(admin.ModelAdmin):
    list_display = ("lookup_key", "tier", "interval", "unit_amount_cents", "stripe_price_id", "active", "created_at")
    list_filter = ("active", "interval")
    list_select_related = ("tier",)
    readonly_fields = ("tier", "interval", "lookup_key", "stripe_price_id", "unit_amount_cents", "active",
                       "created_at")

    def has_add_permission(self, request: Any) -> bool:
        return False  # prices come from `manage.py setup_stripe`


@admin.register(BillingAccount)
class BillingAccountAdmin(admin.ModelAdmin):
    list_display = ("account", "stripe_customer_id", "stripe_subscription_id", "subscription_status",
                    "current_period_end", "pending_tier", "payment_failed_at", "paid_through")
    list_filter = ("subscription_status",)
    list_select_related = ("account__user", "account__tier", "pending_tier")
    search_fields = ("account__user__username", "account__user__email", "stripe_customer_id",
                     "stripe_subscription_id")
    actions = ["refresh_from_stripe"]

    def get_readonly_fields(self, request: Any, obj: Any = None) -> list[str]:
        return [f.name for f in BillingAccount._meta.fields]

    def has_add_permission(self, request: Any) -> bool:
        return False

    @admin.action(description="Re-fetch the subscription from Stripe and apply it")
    def refresh_from_stripe(self, request: Any, queryset: Any) -> None:
        for billing in queryset.exclude(stripe_subscription_id=""):
            try:
                result = services.subscription_refresh(subscription_id=billing.stripe_subscription_id)
                self.message_user(request, f"{billing}: {result}")
            except ApplicationError as exc:
                self.message_user(request, f"{billing}: {exc.message}", level=messages.ERROR)


@admin.register(OverageInvoice)
class OverageInvoiceAdmin(admin.ModelAdmin):
    list_display = ("id", "billing_account", "period", "tokens", "rate", "amount_cents", "state", "reason",
                    "stripe_invoice_item_id", "stripe_invoice_id", "attempts", "updated_at")
    list_filter = ("state", "reason")
    list_select_related = ("billing_account__account__user", "period__account__user")
    search_fields = ("stripe_invoice_item_id", "stripe_invoice_id", "idempotency_key")
    actions = ["retry"]

    def get_readonly_fields(self, request: Any, obj: Any = None) -> list[str]:
        return [f.name for f in OverageInvoice._meta.fields]

    def has_add_permission(self, request: Any) -> bool:
        return False

    def has_delete_permission(self, request: Any, obj: Any = None) -> bool:
        return False

    @admin.action(description="Retry: resume unfinished items (same idempotency key)")
    def retry(self, request: Any, queryset: Any) -> None:
        for invoice in queryset:
            if invoice.state != OverageInvoice.State.STARTED:
                self.message_user(request, f"#{invoice.pk} is {invoice.state}; nothing to retry.")
                continue
            try:
                invoice = services.overage_invoice_push(overage_invoice_id=invoice.pk)
                self.message_user(request, f"#{invoice.pk}: {invoice.state} {invoice.stripe_invoice_item_id}")
            except ApplicationError as exc:
                self.message_user(request, f"#{invoice.pk}: {exc.message}", level=messages.ERROR)


@admin.register(PlanChange)
class PlanChangeAdmin(admin.ModelAdmin):
    """Support's plan changes (made from the account's page); read-only, with a retry for
    the ones whose Stripe answer was never recorded."""

    list_display = ("id", "account", "stripe_subscription_id", "from_tier", "to_tier", "proration_behavior", "state",
                    "requested_by", "attempts", "created_at")
    list_filter = ("state", "proration_behavior")
    list_select_related = ("account__user", "from_tier", "to_tier")
    search_fields = ("account__user__username", "account__user__email", "stripe_subscription_id")
    actions = ["retry"]

    def get_readonly_fields(self, request: Any, obj: Any = None) -> list[str]:
        return [f.name for f in PlanChange._meta.fields]

    def has_add_permission(self, request: Any) -> bool:
        return False

    def has_delete_permission(self, request: Any, obj: Any = None) -> bool:
        return False

    @admin.action(description="Retry: resume unfinished changes (same idempotency key)")
    def retry(self, request: Any, queryset: Any) -> None:
        for change in queryset:
            if change.state != PlanChange.State.STARTED:
                self.message_user(request, f"#{change.pk} is {change.state}; nothing to retry.")
                continue
            try:
                change = plan_change_send(plan_change_id=change.pk)
                self.message_user(request, f"#{change.pk}: {change.state}")
            except ApplicationError as exc:
                self.message_user(request, f"#{change.pk}: {exc.message}", level=messages.ERROR)


@admin.register(TierComp)
class TierCompAdmin(admin.ModelAdmin):
    """Comps (tiers granted without billing), granted and ended from the account's page."""

    list_display = ("account", "tier", "reason", "starts_at", "ends_at", "created_by", "ended_at", "ended_by")
    list_filter = ("tier",)
    list_select_related = ("account__user", "tier")
    search_fields = ("account__user__username", "account__user__email", "reason")

    def get_readonly_fields(self, request: Any, obj: Any = None) -> list[str]:
        return [f.name for f in TierComp._meta.fields]

    def has_add_permission(self, request: Any) -> bool:
        return False

    def has_delete_permission(self, request: Any, obj: Any = None) -> bool:
        return False


# dj-stripe's trigger admin defines `reprocess` but does not offer it; offer a retry
# that goes through our service (which records a repeated failure on the trigger).
admin.site.unregister(WebhookEventTrigger)


@admin.register(WebhookEventTrigger)
class WebhookEventTriggerAdmin(DjstripeWebhookEventTriggerAdmin):
    actions = ["retry"]

    @admin.action(description="Retry processing the selected webhooks")
    def retry(self, request: Any, queryset: Any) -> None:
        for trigger in queryset:
            try:
                services.webhook_trigger_retry(trigger_id=trigger.pk)
                self.message_user(request, f"Webhook {trigger.pk} processed.")
            except ApplicationError as exc:
                self.message_user(request, f"Webhook {trigger.pk}: {exc.message}", level=messages.ERROR)
