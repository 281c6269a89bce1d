"""The support console for metering. Changes go through services; the ledger and
the audit log are read-only."""
from django.contrib import admin, messages

from .models import Account, AuditLog, LedgerEntry, OperationType, Provider, Reservation, ServiceKey, Tier, UsagePeriod
from .services import RequestContext, audit_record, service_key_create, service_key_revoke, tier_apply_terms


class ReadOnlyAdmin(admin.ModelAdmin):
    def has_add_permission(self, request, obj=None):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False


@admin.register(Tier)
class TierAdmin(admin.ModelAdmin):
    list_display = ("slug", "name", "monthly_token_limit", "overage_rate", "allow_overage", "max_overage_percentage",
                    "hard_limit", "requests_per_hour")

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
    list_display = ("slug", "name", "counting", "default_encoding", "calibration_factor", "calibration_samples",
                    "recent_error", "calibrated_at", "active")
    readonly_fields = ("calibration_samples", "recent_error", "calibrated_at")


@admin.register(ServiceKey)
class ServiceKeyAdmin(admin.ModelAdmin):
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
        self.message_user(request, f"Revoked {queryset.count()} key(s).")


@admin.register(Account)
class AccountAdmin(admin.ModelAdmin):
    list_display = ("user", "tier", "status", "billing_hold", "anomaly_hold", "created_at")
    list_select_related = ("user", "tier")
    list_filter = ("tier", "status", "billing_hold", "anomaly_hold")
    search_fields = ("user__username", "user__email")
    readonly_fields = ("user", "tier", "status", "billing_hold", "anomaly_hold", "created_at")

    def has_add_permission(self, request, obj=None):
        return False


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
