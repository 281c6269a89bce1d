"""The support console for metering. Changes go through services; the ledger and
the audit log are read-only."""
from decimal import Decimal

from django import forms
from django.contrib import admin, messages
from django.contrib.admin.models import ADDITION, CHANGE, DELETION, LogEntry
from django.core.exceptions import PermissionDenied
from django.db.models import Exists, OuterRef, Q, Value
from django.db.models.signals import post_save
from django.dispatch import receiver
from django.http import Http404, HttpResponseRedirect
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils.html import format_html, format_html_join
from django.utils.safestring import mark_safe

from consensus_tokens.errors import ApplicationError

from . import selectors
from .models import Account, AuditLog, LedgerEntry, OperationType, Provider, Reservation, ServiceKey, Tier, UsagePeriod
from .services import (
    RequestContext,
    account_change_tier,
    audit_record,
    period_reset,
    reservation_release_by_support,
    service_key_create,
    service_key_revoke,
    tier_apply_terms,
    usage_adjust,
    usage_get,
    usage_grant,
    usage_percentage,
    usage_status,
)

try:  # alerts and billing build on metering; the console shows their parts when they are installed
    from alerts.models import AnomalyFlag
    from alerts.selectors import alert_events_for_user
except ImportError:  # pragma: no cover
    AnomalyFlag = None
    alert_events_for_user = None

INLINE_ROWS = 20


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
    list_display = ("slug", "name", "counting", "default_encoding", "calibration_factor", "calibration_samples",
                    "recent_error", "calibrated_at", "active")
    readonly_fields = ("calibration_samples", "recent_error", "calibrated_at")


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


# --- accounts: the support console's main page --------------------------------------------------

class FlaggedFilter(admin.SimpleListFilter):
    title = "flagged"
    parameter_name = "flagged"

    def lookups(self, request, model_admin):
        return [("yes", "Flagged (hold or open anomaly flag)"), ("no", "Not flagged")]

    def queryset(self, request, queryset):
        flagged = Q(billing_hold=True) | Q(anomaly_hold=True) | Q(open_flags=True)
        if self.value() == "yes":
            return queryset.filter(flagged)
        if self.value() == "no":
            return queryset.exclude(flagged)
        return queryset


class LedgerInline(ReadOnlyPermissions, admin.TabularInline):
    """The account's latest ledger rows, read-only (corrections are new rows)."""

    model = LedgerEntry
    fk_name = "account"
    extra = 0
    max_num = 0
    can_delete = False
    show_change_link = False
    verbose_name_plural = f"Ledger (latest {INLINE_ROWS}; the full ledger is under Ledger entries)"
    fields = ("created_at", "kind", "used_delta", "reserved_delta", "operation_id", "operation_type", "provider",
              "model", "actor", "reason")
    readonly_fields = fields
    ordering = ("-created_at", "-id")
    account: Account | None = None

    def get_queryset(self, request):
        qs = super().get_queryset(request)
        if self.account is None:
            return qs.none()
        latest = list(selectors.ledger_for_user(user_id=self.account.user_id).values_list("pk", flat=True)[:INLINE_ROWS])
        return qs.filter(pk__in=latest)


class ChangeTierForm(forms.Form):
    tier = forms.ModelChoiceField(queryset=Tier.objects.all(), empty_label=None)
    reason = forms.CharField(widget=forms.Textarea(attrs={"rows": 3, "cols": 60}),
                             help_text="Why? Kept in the audit log with your name.")


class TokensForm(forms.Form):
    KINDS = [("grant", "Grant bonus tokens (usage goes down)"),
             ("adjust", "Correct usage (+ adds used tokens, − gives them back)")]
    kind = forms.ChoiceField(choices=KINDS, widget=forms.RadioSelect, initial="grant")
    tokens = forms.IntegerField(min_value=-10_000_000, max_value=10_000_000,
                                help_text="Whole tokens. A grant must be positive.")
    reason = forms.CharField(widget=forms.Textarea(attrs={"rows": 3, "cols": 60}),
                             help_text="Why? It is written on the ledger entry and in the audit log.")


class ResetForm(forms.Form):
    reason = forms.CharField(widget=forms.Textarea(attrs={"rows": 3, "cols": 60}))
    confirm = forms.BooleanField(label="Yes, start this period's count again from zero (history stays)")


class ReleaseForm(forms.Form):
    reservation = forms.ModelChoiceField(queryset=Reservation.objects.none(), empty_label=None,
                                         label="Held reservation")
    reason = forms.CharField(widget=forms.Textarea(attrs={"rows": 3, "cols": 60}))

    def __init__(self, *args, account: Account, **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["reservation"].queryset = Reservation.objects.filter(
            account=account, status=Reservation.Status.HELD).order_by("created_at")
        self.fields["reservation"].label_from_instance = (
            lambda r: f"{r.tokens:,} tokens · {r.operation_id or 'no operation id'} · "
                      f"held since {r.created_at:%Y-%m-%d %H:%M} UTC, expires {r.expires_at:%H:%M}")


class ResendAlertForm(forms.Form):
    alert = forms.ChoiceField(label="Alert", help_text="Pending or failed alerts of this account; a failed one "
                                                       "gets a fresh set of attempts.")
    reason = forms.CharField(widget=forms.Textarea(attrs={"rows": 3, "cols": 60}))

    def __init__(self, *args, account: Account, **kwargs):
        super().__init__(*args, **kwargs)
        events = [] if alert_events_for_user is None else [
            e for e in alert_events_for_user(user=account.user)[:200] if e.status in ("pending", "failed")]
        self.fields["alert"].choices = [
            (e.pk, f"{e} · {e.get_status_display()} · {e.created_at:%Y-%m-%d %H:%M} UTC · {e.recipient}")
            for e in events]


SUPPORT_ACTIONS = {
    "change-tier": ("Change tier", ChangeTierForm),
    "tokens": ("Grant or correct tokens", TokensForm),
    "reset": ("Reset the current period", ResetForm),
    "release": ("Release a stuck reservation", ReleaseForm),
    "resend-alert": ("Resend an alert", ResendAlertForm),
}


@admin.register(Account)
class AccountAdmin(admin.ModelAdmin):
    list_display = ("user", "email", "tier", "usage", "status", "period_end", "stripe_status", "flags")
    list_select_related = ("user", "tier", "billing")
    list_filter = ("tier", "status", FlaggedFilter)
    search_fields = ("user__username", "user__email", "billing__stripe_customer_id")
    readonly_fields = ("user", "tier", "status", "billing_hold", "anomaly_hold", "created_at", "current_period",
                       "held_reservations", "recent_alerts", "recent_audit")
    fieldsets = [
        (None, {"fields": ("user", "tier", "status", ("billing_hold", "anomaly_hold"), "created_at")}),
        ("Current period", {"fields": ("current_period", "held_reservations")}),
        ("Alerts", {"fields": ("recent_alerts",)}),
        (f"Audit log (latest {INLINE_ROWS})", {"fields": ("recent_audit",), "classes": ("collapse",)}),
    ]
    inlines = [LedgerInline]
    change_form_template = "admin/metering/account/change_form.html"

    def get_queryset(self, request):
        flags = Exists(AnomalyFlag.objects.filter(account=OuterRef("pk"), status="open")) if AnomalyFlag else Value(False)
        return selectors.accounts_for_console().annotate(open_flags=flags)

    def has_add_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False

    def get_inline_instances(self, request, obj=None):
        inlines = super().get_inline_instances(request, obj)
        for inline in inlines:
            inline.account = obj
        return inlines

    # list columns
    @admin.display(description="e-mail", ordering="user__email")
    def email(self, obj):
        return obj.user.email

    @admin.display(description="usage")
    def usage(self, obj):
        if obj.current_used is None:
            return "–"
        if not obj.current_limit:
            return f"{obj.current_used:,}"
        pct = usage_percentage(used=obj.current_used, limit=obj.current_limit, cap=obj.current_limit)
        return format_html('<span class="usage-pct status-{}">{}%</span>', usage_status(pct), f"{pct:g}")

    @admin.display(description="period ends", ordering="current_end")
    def period_end(self, obj):
        return obj.current_end

    @admin.display(description="Stripe")
    def stripe_status(self, obj):
        billing = getattr(obj, "billing", None)
        return (billing.subscription_status or "no subscription") if billing else "–"

    @admin.display(description="flags")
    def flags(self, obj):
        flags = [name for name, on in (("billing hold", obj.billing_hold), ("anomaly hold", obj.anomaly_hold),
                                       ("open anomaly flag", getattr(obj, "open_flags", False))) if on]
        return ", ".join(flags) or "–"

    # change page sections
    @admin.display(description="Usage")
    def current_period(self, obj):
        usage = usage_get(user_id=obj.user_id)
        return format_html(
            '<div class="support-usage" data-field="admin-usage">'
            '<strong data-field="admin-used">{}</strong> of <strong data-field="admin-limit">{}</strong> tokens '
            '(<span class="usage-pct status-{}">{}%</span>, {}) · reserved {} · cap {} · overage {} tokens, '
            '${} so far<br>{} – {}</div>',
            f"{usage.used:,}", f"{usage.limit:,}", usage.status, f"{usage.percentage:g}", usage.status,
            f"{usage.reserved:,}", f"{usage.cap:,}", f"{usage.overage_tokens:,}",
            usage.overage_charge.quantize(Decimal("0.01")), f"{usage.period_start:%Y-%m-%d %H:%M}",
            f"{usage.period_end:%Y-%m-%d %H:%M} UTC")

    @admin.display(description="Held reservations")
    def held_reservations(self, obj):
        held = list(Reservation.objects.filter(account=obj, status=Reservation.Status.HELD).order_by("created_at")[:20])
        if not held:
            return "None"
        return format_html_join(mark_safe("<br>"), "{} tokens · {} · expires {}",
                                ((f"{r.tokens:,}", r.operation_id or r.pk, f"{r.expires_at:%Y-%m-%d %H:%M}")
                                 for r in held))

    @admin.display(description="Recent alerts")
    def recent_alerts(self, obj):
        if alert_events_for_user is None:
            return "–"
        events = list(alert_events_for_user(user=obj.user)[:10])
        if not events:
            return "None sent"
        rows = format_html_join("", "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td><a href=\"{}\">open</a></td></tr>",
                                ((f"{e.created_at:%Y-%m-%d %H:%M}", str(e), e.get_status_display(), e.recipient,
                                  reverse("admin:alerts_alertevent_change", args=[e.pk])) for e in events))
        return format_html('<table class="support-table"><thead><tr><th>When</th><th>Alert</th><th>Status</th>'
                           '<th>To</th><th></th></tr></thead><tbody>{}</tbody></table>', rows)

    @admin.display(description="Audit log")
    def recent_audit(self, obj):
        rows = AuditLog.objects.filter(user_id=obj.user_id).order_by("-created_at", "-id")[:INLINE_ROWS]
        body = format_html_join("", "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                                ((f"{a.created_at:%Y-%m-%d %H:%M:%S}", a.action, a.result,
                                  "" if a.tokens is None else f"{a.tokens:,}", a.actor,
                                  a.detail.get("reason", "") if isinstance(a.detail, dict) else "") for a in rows))
        return format_html('<table class="support-table" data-table="audit"><thead><tr><th>When</th><th>Action</th>'
                           '<th>Result</th><th>Tokens</th><th>By</th><th>Reason</th></tr></thead>'
                           '<tbody>{}</tbody></table>', body)

    # support actions
    def get_urls(self):
        return [
            path("<int:object_id>/support/<slug:action>/", self.admin_site.admin_view(self.support_action),
                 name="metering_account_support"),
        ] + super().get_urls()

    def change_view(self, request, object_id, form_url="", extra_context=None):
        # Every field here is read-only: changes are the support actions, so no Save buttons.
        extra_context = {**(extra_context or {}), "show_save": False, "show_save_and_continue": False,
                         "show_save_and_add_another": False, "support_actions": [
                             (slug, title) for slug, (title, _) in SUPPORT_ACTIONS.items()]}
        return super().change_view(request, object_id, form_url, extra_context)

    def support_action(self, request, object_id: int, action: str):
        if action not in SUPPORT_ACTIONS:
            raise Http404("No such support action.")
        account = Account.objects.select_related("user", "tier").filter(pk=object_id).first()
        if account is None:
            raise Http404("No such account.")
        if not self.has_change_permission(request, account):
            raise PermissionDenied
        title, form_class = SUPPORT_ACTIONS[action]
        kwargs = {"account": account} if form_class in (ReleaseForm, ResendAlertForm) else {}
        initial = {"tier": account.tier_id} if form_class is ChangeTierForm else None
        form = form_class(request.POST or None, initial=initial, **kwargs)
        if request.method == "POST" and form.is_valid():
            try:
                message = self._perform(request, account, action, form.cleaned_data)
            except ApplicationError as error:
                form.add_error(None, error.message)
            else:
                self.message_user(request, message, messages.SUCCESS)
                return HttpResponseRedirect(reverse("admin:metering_account_change", args=[account.pk]))
        context = {
            **self.admin_site.each_context(request), "title": f"{title}: {account.user}", "form": form,
            "account": account, "opts": self.model._meta, "original": account, "action_title": title,
            "usage": usage_get(user_id=account.user_id),
        }
        return TemplateResponse(request, "admin/metering/account/support_action.html", context)

    def _perform(self, request, account: Account, action: str, data: dict) -> str:
        actor = request.user.get_username()
        reason = data.get("reason", "")
        if action == "change-tier":
            account_change_tier(account=account, tier=data["tier"], actor=actor, reason=reason)
            return f"{account.user} is now on {data['tier']}; the new limit applies at once."
        if action == "tokens":
            if data["kind"] == "grant":
                usage_grant(account=account, tokens=data["tokens"], reason=reason, actor=actor)
                return f"Granted {data['tokens']:,} bonus tokens to {account.user}."
            usage_adjust(account=account, tokens=data["tokens"], reason=reason, actor=actor)
            return f"Corrected {account.user}'s usage by {data['tokens']:+,} tokens."
        if action == "reset":
            period_reset(account=account, reason=reason, actor=actor)
            return f"{account.user}'s current period starts again from zero."
        ctx = RequestContext(actor=actor, client_ip=request.META.get("REMOTE_ADDR") or None)
        if action == "resend-alert":
            from alerts.services import alert_resend_by_support

            alert_resend_by_support(user_id=account.user_id, event_id=int(data["alert"]), reason=reason, ctx=ctx)
            return "The alert is queued to be sent again."
        reservation = data["reservation"]
        reservation_release_by_support(account=account, reservation=reservation, reason=reason, ctx=ctx)
        return f"Released {reservation.tokens:,} held tokens."
