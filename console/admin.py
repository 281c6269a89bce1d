"""The support console's accounts page: an account with its period, ledger, audit
log, billing status and alerts, and the support actions. Actions call services;
every other model's admin is its own app's."""
from decimal import Decimal

from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied
from django.db.models import Q
from django.http import Http404, HttpResponseRedirect
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils.html import format_html, format_html_join
from django.utils.safestring import mark_safe

from alerts.selectors import alert_events_for_user
from alerts.services import alert_resend_by_support
from billing.selectors import billing_account_for, live_subscription_for, plan_changes_for, tier_price_by_stripe_id
from billing.services.comps import comp_end, comp_end_preview, comp_grant, comp_in_force, comp_preview
from billing.services.plan_changes import plan_change_preview, plan_change_request
from consensus_tokens.client_ip import client_ip
from consensus_tokens.errors import ApplicationError
from metering import selectors as metering_selectors
from metering.admin import ReadOnlyPermissions
from metering.models import Account, AuditLog, LedgerEntry
from metering.services import (
    RequestContext,
    period_reset,
    reservation_release_by_support,
    usage_adjust,
    usage_get,
    usage_grant,
    usage_percentage,
    usage_status,
)

from . import selectors
from .forms import CONFIRMED_ACTIONS, SUPPORT_ACTIONS, ChangePlanForm, CompForm, ReleaseForm, ResendAlertForm

INLINE_ROWS = 20


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
        latest = list(metering_selectors.ledger_for_user(user_id=self.account.user_id).values_list("pk", flat=True)[:INLINE_ROWS])
        return qs.filter(pk__in=latest)


@admin.register(Account)
class AccountAdmin(admin.ModelAdmin):
    list_display = ("user", "email", "tier", "comp", "usage", "status", "period_end", "stripe_status", "flags")
    list_select_related = ("user", "tier", "billing")
    list_filter = ("tier", "status", FlaggedFilter)
    search_fields = ("user__username", "user__email", "billing__stripe_customer_id")
    # The tier is never edited here: it changes through Stripe (a subscriber's plan) or by a
    # comp with a reason and an end (the support actions), each confirmed before it acts.
    readonly_fields = ("user", "tier", "comp_in_force", "subscription", "status", "billing_hold", "anomaly_hold",
                       "created_at", "current_period", "held_reservations", "recent_alerts", "recent_audit")
    fieldsets = [
        (None, {"fields": ("user", "tier", "comp_in_force", "subscription", "status", ("billing_hold", "anomaly_hold"),
                           "created_at")}),
        ("Current period", {"fields": ("current_period", "held_reservations")}),
        ("Alerts", {"fields": ("recent_alerts",)}),
        (f"Audit log (latest {INLINE_ROWS})", {"fields": ("recent_audit",), "classes": ("collapse",)}),
    ]
    inlines = [LedgerInline]
    change_form_template = "admin/metering/account/change_form.html"

    def get_queryset(self, request):
        return selectors.accounts_for_console()

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

    @admin.display(description="comp")
    def comp(self, obj):
        if not getattr(obj, "comp_tier_name", None):
            return "–"
        return format_html('<span data-field="comp">{} until {} ({})</span>', obj.comp_tier_name,
                           f"{obj.comp_ends_at:%Y-%m-%d %H:%M} UTC", obj.comp_reason)

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
    @admin.display(description="Comp")
    def comp_in_force(self, obj):
        comp = comp_in_force(account_id=obj.pk)
        if comp is None:
            return "None: the tier is what the subscription pays for (or the default tier without one)"
        return format_html('<div data-field="admin-comp"><strong>{}</strong> granted without billing until {} '
                           '(reason: {}; by {} on {})</div>', comp.tier.name, f"{comp.ends_at:%Y-%m-%d %H:%M} UTC",
                           comp.reason, comp.created_by, f"{comp.created_at:%Y-%m-%d}")

    @admin.display(description="Stripe subscription")
    def subscription(self, obj):
        billing = billing_account_for(account=obj)
        if billing is None or not billing.stripe_subscription_id:
            return "None"
        price = tier_price_by_stripe_id(price_id=billing.stripe_price_id)
        paying = f"{price.tier.name} {price.get_interval_display().lower()}" if price else billing.stripe_price_id
        changes = format_html_join("", "<li>{}: {} → {} ({}, {}) by {} · {}</li>", (
            (f"{c.created_at:%Y-%m-%d %H:%M}", c.from_tier or "–", c.to_tier, c.proration_behavior,
             c.get_state_display(), c.requested_by, c.reason) for c in plan_changes_for(account=obj)[:5]))
        return format_html('<span data-field="admin-subscription">{} · {} · {}</span>{}',
                           billing.stripe_subscription_id, paying, billing.subscription_status or "–",
                           format_html("<ul>{}</ul>", changes) if changes else "")

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
        held = list(metering_selectors.reservations_held(account=obj)[:20])
        if not held:
            return "None"
        return format_html_join(mark_safe("<br>"), "{} tokens · {} · expires {}",
                                ((f"{r.tokens:,}", r.operation_id or r.pk, f"{r.expires_at:%Y-%m-%d %H:%M}")
                                 for r in held))

    @admin.display(description="Recent alerts")
    def recent_alerts(self, obj):
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
        # A plan change needs a live subscription; "End comp" a comp in force.
        account = Account.objects.filter(pk=object_id).first()
        hidden = set()
        if account is not None:
            if live_subscription_for(account=account) is None:
                hidden.add("change-plan")
            if comp_in_force(account_id=account.pk) is None:
                hidden.add("end-comp")
        extra_context = {**(extra_context or {}), "show_save": False, "show_save_and_continue": False,
                         "show_save_and_add_another": False, "support_actions": [
                             (slug, title) for slug, (title, _) in SUPPORT_ACTIONS.items() if slug not in hidden]}
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
        initial = {"tier": account.tier_id} if form_class in (ChangePlanForm, CompForm) else None
        form = form_class(request.POST or None, initial=initial, **kwargs)
        context = {
            **self.admin_site.each_context(request), "title": f"{title}: {account.user}", "form": form,
            "account": account, "opts": self.model._meta, "original": account, "action_title": title,
            "usage": usage_get(user_id=account.user_id),
        }
        if action == "change-plan" and live_subscription_for(account=account) is None:
            # Without a subscription Stripe has nothing to change: a tier can only be a comp.
            context["refusal"] = (f"{account.user} has no live Stripe subscription: a tier change can only be "
                                  f"a comp (granted without billing, with a reason and an end date).")
            if request.method == "POST":
                form.is_valid()
                form.add_error(None, context["refusal"])
            return TemplateResponse(request, "admin/metering/account/support_action.html", context)
        if request.method == "POST" and form.is_valid():
            try:
                if action in CONFIRMED_ACTIONS and "_confirm" not in request.POST:
                    # Say what will happen (through Stripe, or a comp without billing); only the
                    # confirm button on that page acts.
                    context.update(title=f"Confirm: {title.lower()} for {account.user}",
                                   confirmation=self._describe(account, action, form.cleaned_data))
                    return TemplateResponse(request, "admin/metering/account/support_confirm.html", context)
                message = self._perform(request, account, action, form.cleaned_data)
            except ApplicationError as error:
                form.add_error(None, error.message)
            else:
                self.message_user(request, message, messages.SUCCESS)
                return HttpResponseRedirect(reverse("admin:metering_account_change", args=[account.pk]))
        return TemplateResponse(request, "admin/metering/account/support_action.html", context)

    def _describe(self, account: Account, action: str, data: dict) -> str:
        """What the action will do, in words, before it does it (services check it can be done)."""
        if action == "change-plan":
            return plan_change_preview(account=account, tier=data["tier"]).describe()
        if action == "comp":
            return comp_preview(account=account, tier=data["tier"], ends_at=data["ends_at"],
                                reason=data["reason"]).describe()
        return comp_end_preview(account=account)[1]

    def _perform(self, request, account: Account, action: str, data: dict) -> str:
        actor = request.user.get_username()
        reason = data.get("reason", "")
        if action == "change-plan":
            change = plan_change_request(account=account, tier=data["tier"], reason=reason, actor=actor)
            account.refresh_from_db(fields=["tier"])
            return (f"Stripe subscription {change.stripe_subscription_id} now pays for {change.to_tier} "
                    f"({change.proration_behavior}); {account.user} is now on {account.tier or 'no tier'}.")
        if action == "comp":
            comp = comp_grant(account=account, tier=data["tier"], ends_at=data["ends_at"], reason=reason, actor=actor)
            return (f"{account.user} is now on {comp.tier} without billing until {comp.ends_at:%Y-%m-%d %H:%M} UTC; "
                    f"Stripe is not changed.")
        if action == "end-comp":
            comp, _ = comp_end_preview(account=account)
            comp_end(comp_id=comp.pk, actor=actor, reason=reason)
            account.refresh_from_db(fields=["tier"])
            return f"The comp of {comp.tier} has ended; {account.user} is now on {account.tier or 'no tier'}."
        if action == "tokens":
            if data["kind"] == "grant":
                usage_grant(account=account, tokens=data["tokens"], reason=reason, actor=actor)
                return f"Granted {data['tokens']:,} bonus tokens to {account.user}."
            usage_adjust(account=account, tokens=data["tokens"], reason=reason, actor=actor)
            return f"Corrected {account.user}'s usage by {data['tokens']:+,} tokens."
        if action == "reset":
            period_reset(account=account, reason=reason, actor=actor)
            return f"{account.user}'s current period starts again from zero."
        ctx = RequestContext(actor=actor, client_ip=client_ip(request) or None)
        if action == "resend-alert":
            alert_resend_by_support(user_id=account.user_id, event_id=int(data["alert"]), reason=reason, ctx=ctx)
            return "The alert is queued to be sent again."
        reservation = data["reservation"]
        reservation_release_by_support(account=account, reservation=reservation, reason=reason, ctx=ctx)
        return f"Released {reservation.tokens:,} held tokens."
