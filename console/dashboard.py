"""The usage dashboard: server-rendered pages behind sign-in, reading through
selectors and the same `usage_get` the API answers with, so the two never differ.

Every page costs a fixed number of queries: the figures come from the period's
counters and the daily rollups, the activity table pages by keyset."""
from __future__ import annotations

import csv
import re
from datetime import date, timedelta
from typing import Any, Iterator

from django import forms
from django.contrib import messages
from django.contrib.auth.mixins import LoginRequiredMixin
from django.core.validators import MaxValueValidator, MinValueValidator
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect, StreamingHttpResponse
from django.urls import reverse
from django.utils import timezone
from django.views import View
from django.views.generic import TemplateView

from alerts.selectors import PREFERENCE_KINDS, alert_preferences_get
from alerts.services import alert_preferences_update
from billing.selectors import billing_summary
from consensus_tokens.client_ip import client_ip
from consensus_tokens.errors import ApplicationError
from metering import selectors, services
from metering.models import Tier, UsagePeriod

from . import charts


def home(request: HttpRequest) -> HttpResponse:
    """`/`: the dashboard for a signed-in user, otherwise the sign-in page."""
    return HttpResponseRedirect(reverse("dashboard:home") if request.user.is_authenticated else reverse("login"))


EARLIEST, LATEST = date(1970, 1, 1), date(9998, 12, 31)


def _date_field(label: str) -> forms.DateField:
    return forms.DateField(label=label, required=False, widget=forms.DateInput(attrs={"type": "date"}),
                           validators=[MinValueValidator(EARLIEST), MaxValueValidator(LATEST)])


class ActivityFilter(forms.Form):
    op = forms.ChoiceField(label="Operation type", required=False)
    since = _date_field("From")
    until = _date_field("To")

    def __init__(self, *args: Any, operation_types: list[str], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fields["op"].choices = [("", "All operation types")] + [(slug, slug) for slug in operation_types]

    def clean(self) -> dict[str, Any]:
        data = super().clean()
        if data.get("since") and data.get("until") and data["since"] > data["until"]:
            self.add_error("until", "The end date is before the start date.")
        return data


def _period_id(raw: str) -> int | None:
    """A period id from the query string; anything else (huge, signed, ²) is ignored."""
    return int(raw) if re.fullmatch(r"[0-9]{1,18}", raw or "") else None


def _optional_bool(value: Any) -> bool:
    return str(value).lower() in ("1", "true", "on", "yes")


def _plan(account, tiers: list[Tier], billing: dict[str, Any] | None, current: UsagePeriod) -> dict[str, Any]:
    """The plan card: the tier, and the terms in force now, taken from the current period
    (the true monthly allowance and next reset, whatever the billing interval, and the
    overage room the account really has)."""
    tier = account.tier
    upgrades = [t for t in tiers if tier is None or t.monthly_token_limit > tier.monthly_token_limit]
    return {
        "tier": tier,
        "allowance": current.token_limit,
        "next_reset": current.ends_at,
        "overage_room": max(0, current.cap - current.token_limit),
        "can_pay": account.can_pay,
        "yearly": (billing or {}).get("interval") == "year",
        "features": list(tier.features or []) if tier else [],
        "others": [t for t in tiers if tier is None or t.pk != tier.pk],
        "upgrades": upgrades,
        "suggested": upgrades[0] if upgrades else None,
        "billing": billing,
        # Stripe's words ("past_due") read as people's ("Past due")
        "status": ((billing or {}).get("subscription_status") or account.status).replace("_", " ").capitalize(),
    }


class DashboardView(LoginRequiredMixin, TemplateView):
    template_name = "dashboard/dashboard.html"

    def get_context_data(self, **kwargs: Any) -> dict[str, Any]:
        context = super().get_context_data(**kwargs)
        request = self.request
        user = request.user
        now = timezone.now()
        account = services.account_for_user(user_id=user.pk)
        current = services.period_current(account=account, now=now)
        period: UsagePeriod = current
        wanted = _period_id(request.GET.get("period", ""))
        if wanted is not None and wanted != current.pk:
            period = selectors.period_for_account(account_id=account.pk, period_id=wanted) or current
        is_current = period.pk == current.pk
        tier_slug = account.tier.slug if account.tier else None
        # The current period's figures are exactly GET /api/tokens/usage's.
        usage = services.usage_get(user_id=user.pk) if is_current else services.usage_of(period, tier_slug)
        previous = selectors.period_before(period=period)
        summary = selectors.period_summary(period=period, previous=previous)
        first_day = period.starts_at.date()
        last_day = (period.ends_at - timedelta(microseconds=1)).date()
        chart = charts.daily_chart(
            first_day=first_day, days=(last_day - first_day).days + 1,
            current={d.day: (d.tokens, d.requests) for d in summary.daily},
            previous_first_day=previous.starts_at.date() if previous else None,
            previous={d.day: (d.tokens, d.requests) for d in summary.previous_daily},
            through=now.date() if is_current else None)
        operation_types = selectors.operation_types_active()
        activity_filter = ActivityFilter(request.GET or None, operation_types=operation_types)
        filters: dict[str, Any] = {}
        if activity_filter.is_bound and activity_filter.is_valid():
            filters = {"operation_type": activity_filter.cleaned_data["op"] or None,
                       "since": activity_filter.cleaned_data["since"], "until": activity_filter.cleaned_data["until"]}
        activity = selectors.activity_page(user_id=user.pk, cursor=request.GET.get("cursor") or None, **filters)
        query = request.GET.copy()
        query.pop("cursor", None)
        tiers = selectors.tiers_for_plans()
        context.update({
            "usage": usage, "period": period, "is_current": is_current, "previous": previous,
            "account": account, "summary": summary, "chart": chart,
            "forecast": selectors.usage_forecast(used=usage.used, limit=usage.limit, cap=usage.cap,
                                                 overage_rate=usage.overage_rate, period_start=usage.period_start,
                                                 period_end=usage.period_end, now=now) if is_current else None,
            "days_total": (last_day - first_day).days + 1,
            "last_day": last_day,
            "gauge": _gauge(usage),
            "by_operation": charts.breakdown_rows(summary.by_operation, total=summary.total_tokens),
            "by_model": charts.breakdown_rows(summary.by_model, total=summary.total_tokens),
            "activity": activity, "activity_filter": activity_filter,
            "activity_query": query.urlencode(), "filtered": bool(filters and any(filters.values())),
            "periods": selectors.periods_recent(account_id=account.pk),
            "plan": _plan(account, tiers, billing_summary(account=account), current),
            "preferences": alert_preferences_get(user=user),
        })
        return context


def _gauge(usage: services.Usage) -> dict[str, Any]:
    """Widths (in % of the cap, or of the limit when there is no overage room) for the meter."""
    scale = max(usage.cap, usage.limit, usage.used + usage.reserved, 1)
    used = max(0, usage.used)
    return {
        "scale": scale,
        "used_pct": round(100 * min(used, scale) / scale, 2),
        "reserved_pct": round(100 * min(usage.reserved, max(0, scale - used)) / scale, 2),
        "limit_pct": round(100 * usage.limit / scale, 2),
        "has_overage_room": usage.cap > usage.limit,
    }


class AlertPreferencesView(LoginRequiredMixin, View):
    """POST from the dashboard's e-mail preferences form (unchecked boxes are off)."""

    def post(self, request: HttpRequest) -> HttpResponse:
        changes = {kind: _optional_bool(request.POST.get(kind)) for kind in PREFERENCE_KINDS}
        try:
            alert_preferences_update(user=request.user, **changes)
        except ApplicationError as error:
            messages.error(request, error.message)
        else:
            services.audit_record(ctx=services.RequestContext(actor=request.user.get_username(),
                                                              client_ip=client_ip(request) or None),
                                  user_id=request.user.pk, action="alert_preferences", result="recorded",
                                  detail=changes)
            messages.success(request, "E-mail preferences saved.")
        return HttpResponseRedirect(reverse("dashboard:home") + "#alerts")


class _Echo:
    def write(self, value: str) -> str:
        return value


def _cell(value: Any) -> Any:
    """Keep spreadsheet programs from running a text cell as a formula."""
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value


class HistoryExportView(LoginRequiredMixin, View):
    """The user's whole ledger (or one period's) as CSV, streamed in chunks."""

    columns = ["created_at", "kind", "tokens", "reserved_delta", "operation_id", "operation_type", "provider",
               "model", "estimated_tokens", "actual_tokens", "reason"]

    def get(self, request: HttpRequest) -> HttpResponse:
        entries = selectors.ledger_for_user(user_id=request.user.pk)
        wanted = _period_id(request.GET.get("period", ""))
        name = "history"
        if wanted is not None:
            period = selectors.period_for_account(account_id=services.account_for_user(user_id=request.user.pk).pk,
                                                  period_id=wanted)
            if period is not None:
                entries = entries.filter(period=period)
                name = f"period-{period.starts_at:%Y-%m-%d}"

        def rows() -> Iterator[str]:
            writer = csv.writer(_Echo())
            yield writer.writerow(self.columns)
            for e in entries.values_list("created_at", "kind", "used_delta", "reserved_delta", "operation_id",
                                         "operation_type", "provider", "model", "estimated_tokens", "actual_tokens",
                                         "reason").iterator(chunk_size=2000):
                yield writer.writerow([e[0].isoformat().replace("+00:00", "Z"), *(_cell(v) for v in e[1:])])

        response = StreamingHttpResponse(rows(), content_type="text/csv; charset=utf-8")
        response["Content-Disposition"] = f'attachment; filename="usage-{name}-{date.today():%Y%m%d}.csv"'
        return response
