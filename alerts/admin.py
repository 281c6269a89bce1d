"""Support console for alerts: what was sent to whom, and anomaly flags to
resolve. Changes go through services."""
from django import forms
from django.contrib import admin, messages
from django.shortcuts import render

from consensus_tokens.errors import ApplicationError

from .models import AlertEvent, AnomalyFlag, EmailPreference
from .services import alerts_requeue, anomaly_flag_resolve


class RecordAdmin(admin.ModelAdmin):
    """Rows written by the system: support reads them and acts through actions."""

    def has_add_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False


@admin.register(AlertEvent)
class AlertEventAdmin(RecordAdmin):
    list_display = ("created_at", "kind", "threshold", "week", "recipient", "status", "attempts", "sent_at")
    list_filter = ("kind", "status", "threshold")
    search_fields = ("recipient", "account__user__username")
    list_select_related = ("account__user",)
    readonly_fields = [f.name for f in AlertEvent._meta.fields]
    actions = ["send_again"]

    @admin.action(description="Retry sending (pending or failed alerts)")
    def send_again(self, request, queryset):
        queued = alerts_requeue(event_ids=list(queryset.values_list("pk", flat=True)))
        self.message_user(request, f"Queued {queued} alert(s) for sending.")


class ResolveForm(forms.Form):
    note = forms.CharField(widget=forms.Textarea(attrs={"rows": 4, "cols": 60}),
                           help_text="What was it, and what did you do? Kept on the flag and in the audit log.")


@admin.register(AnomalyFlag)
class AnomalyFlagAdmin(RecordAdmin):
    list_display = ("created_at", "account", "rule", "observed", "baseline", "window_start", "held", "status",
                    "resolved_by")
    list_filter = ("status", "rule", "held")
    search_fields = ("account__user__username", "account__user__email")
    list_select_related = ("account__user", "account__tier")
    readonly_fields = [f.name for f in AnomalyFlag._meta.fields]
    actions = ["resolve"]

    @admin.action(description="Resolve with a note (lifts the anomaly hold)")
    def resolve(self, request, queryset):
        form = ResolveForm(request.POST if "apply" in request.POST else None)
        if form.is_bound and form.is_valid():
            actor = request.user.get_username()
            for flag in queryset:
                try:
                    anomaly_flag_resolve(flag_id=flag.pk, note=form.cleaned_data["note"], actor=actor)
                except ApplicationError as error:
                    self.message_user(request, f"Flag {flag.pk}: {error.message}", messages.ERROR)
                    return None
            self.message_user(request, f"Resolved {queryset.count()} flag(s).")
            return None
        return render(request, "admin/alerts/anomalyflag/resolve.html", {
            **self.admin_site.each_context(request), "title": "Resolve anomaly flags", "flags": queryset,
            "form": form, "opts": self.model._meta,
            "action_checkbox_name": admin.helpers.ACTION_CHECKBOX_NAME,
        })


@admin.register(EmailPreference)
class EmailPreferenceAdmin(admin.ModelAdmin):
    list_display = ("user", "usage_alerts", "weekly_digest", "period_summary", "updated_at")
    list_select_related = ("user",)
    search_fields = ("user__username", "user__email")
    raw_id_fields = ("user",)
