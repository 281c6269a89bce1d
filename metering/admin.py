"""Metering's own models in the admin. Changes go through services; the ledger and
the audit log are read-only. The accounts page, which shows what billing and alerts
add to an account, is the console's (console/admin.py)."""
from django.contrib import admin, messages
from django.contrib.admin.models import ADDITION, CHANGE, DELETION, LogEntry
from django.db.models.signals import post_save
from django.dispatch import receiver

from .models import Account, AuditLog, Calibration, LedgerEntry, OperationType, Provider, Reservation, ServiceKey, Tier, UsagePeriod
from .services import RequestContext, audit_record, service_key_create, service_key_revoke, tier_apply_terms


class ReadOnlyPermissions:
    def has_add_permission(self, request, obj=None):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False


class ReadOnlyAdmin(ReadOnlyPermissions, admin.ModelAdmin):
    pass


SUPERUSER_TIER_FIELDS = ("slug", "monthly_token_limit", "overage_rate", "allow_overage", "max_overage_percentage",
                         "hard_limit", "monthly_price_cents", "yearly_price_cents", "overage_billing_threshold_cents")


class SuperuserOnlyMixin:
    """Service keys: superusers only, whatever permissions a group grants."""

    def has_module_permission(self, request):
        return request.user.is_active and request.user.is_superuser

    def has_view_permission(self, request, obj=None):
        return request.user.is_active and request.user.is_superuser

    def has_add_permission(self, request, obj=None):
        return request.user.is_active and request.user.is_superuser

    def has_change_permission(self, request, obj=None):
        return request.user.is_active and request.user.is_superuser

    def has_delete_permission(self, request, obj=None):
        return False  # revoke instead: the ledger keeps pointing at the key


@admin.register(Tier)
class TierAdmin(admin.ModelAdmin):
    list_display = ("slug", "name", "monthly_token_limit", "overage_rate", "allow_overage", "max_overage_percentage",
                    "hard_limit", "requests_per_hour")

    def get_readonly_fields(self, request, obj=None):
        # Support may edit a tier's name, features and rate limit; its prices and
        # token terms need a superuser.
        return () if request.user.is_superuser else SUPERUSER_TIER_FIELDS

    def save_model(self, request, obj, form, change):
        super().save_model(request, obj, form, change)
        changed = tier_apply_terms(tier=obj)
        audit_record(ctx=RequestContext(actor=request.user.get_username()), user_id=None, action="tier_change",
                     result="recorded", detail={"tier": obj.slug, "changed": form.changed_data, "openPeriods": changed})
        if changed:
            messages.info(request, f"New terms applied to {changed} open period(s).")


@admin.register(OperationType)
class OperationTypeAdmin(admin.ModelAdmin):
    list_display = ("slug", "name", "base_tokens", "active")


@admin.register(Provider)
class ProviderAdmin(admin.ModelAdmin):
    list_display = ("slug", "name", "counting", "default_encoding", "calibration_factor", "active")


@admin.register(Calibration)
class CalibrationAdmin(ReadOnlyAdmin):
    """What estimates learnt: one row per provider, model and script class ('*' = any),
    written only by the calibration job. A row with a high recent error or few samples
    is the one to look at."""
    list_display = ("provider", "model_or_any", "script_or_any", "factor", "samples", "recent_error_percent",
                    "version", "updated_at")
    list_filter = ("provider", "script_class")
    search_fields = ("provider", "model")

    @admin.display(description="model", ordering="model")
    def model_or_any(self, obj: Calibration) -> str:
        return obj.model or "*"

    @admin.display(description="script", ordering="script_class")
    def script_or_any(self, obj: Calibration) -> str:
        return obj.script_class or "*"

    @admin.display(description="recent mean abs. error", ordering="recent_error")
    def recent_error_percent(self, obj: Calibration) -> str:
        return "-" if obj.recent_error is None else f"{obj.recent_error * 100:.1f}%"


@admin.register(ServiceKey)
class ServiceKeyAdmin(SuperuserOnlyMixin, admin.ModelAdmin):
    list_display = ("name", "prefix", "scope", "environment", "created_at", "last_used_at", "revoked_at")
    fields = ("name", "scope")
    actions = ["revoke"]

    def get_readonly_fields(self, request, obj=None):
        return ("name", "scope") if obj else ()

    def save_model(self, request, obj, form, change):
        if change:
            return
        key, raw = service_key_create(name=obj.name, scope=obj.scope)
        obj.pk = key.pk
        messages.warning(request, f"New key (shown once, store it now): {raw}")

    @admin.action(description="Revoke selected keys")
    def revoke(self, request, queryset):
        for key in queryset:
            service_key_revoke(key=key)
            self.log_change(request, key, "Revoked")  # admin history, and so the audit log
        self.message_user(request, f"Revoked {queryset.count()} key(s).")


@admin.register(UsagePeriod)
class UsagePeriodAdmin(ReadOnlyAdmin):
    list_display = ("account", "starts_at", "ends_at", "used", "reserved", "token_limit", "cap")
    list_select_related = ("account__user",)
    search_fields = ("account__user__username",)


@admin.register(LedgerEntry)
class LedgerEntryAdmin(ReadOnlyAdmin):
    list_display = ("created_at", "account", "kind", "used_delta", "reserved_delta", "operation_id", "operation_type",
                    "provider", "model", "actor")
    list_select_related = ("account__user",)
    list_filter = ("kind", "operation_type", "provider")
    search_fields = ("account__user__username", "operation_id")


@admin.register(Reservation)
class ReservationAdmin(ReadOnlyAdmin):
    list_display = ("id", "account", "tokens", "status", "created_at", "expires_at")
    list_select_related = ("account__user",)
    list_filter = ("status",)


@admin.register(AuditLog)
class AuditLogAdmin(ReadOnlyAdmin):
    list_display = ("created_at", "user", "action", "result", "tokens", "operation_type", "client_ip", "actor",
                    "request_id")
    list_select_related = ("user",)
    list_filter = ("action", "result")
    search_fields = ("user__username", "operation_id", "request_id")


# --- every admin change lands in the audit log -----------------------------------------------------

_ADMIN_RESULTS = {ADDITION: "added", CHANGE: "changed", DELETION: "deleted"}


@receiver(post_save, sender=LogEntry, dispatch_uid="metering.audit_admin_change")
def audit_admin_change(sender, instance: LogEntry, created: bool, **kwargs) -> None:
    """Django admin writes a LogEntry for each add, change and delete (every app's);
    copy it to the audit log, which admin cannot edit, with who did it."""
    if not created:
        return
    from consensus_tokens.logging import request_id_var

    user_id = None
    if instance.content_type_id and instance.content_type.model_class() is Account and instance.object_id:
        user_id = Account.objects.filter(pk=instance.object_id).values_list("user_id", flat=True).first()
    audit_record(ctx=RequestContext(actor=instance.user.get_username() if instance.user_id else "",
                                    request_id=request_id_var.get()),
                 user_id=user_id, action="admin_change", result=_ADMIN_RESULTS.get(instance.action_flag, "changed"),
                 detail={"model": f"{instance.content_type.app_label}.{instance.content_type.model}"
                         if instance.content_type_id else "", "objectId": str(instance.object_id or ""),
                         "object": instance.object_repr, "change": instance.get_change_message()})
