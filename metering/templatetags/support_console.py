"""The admin landing page's numbers (templates/admin/index.html)."""
from __future__ import annotations

from datetime import timedelta
from typing import Any

from django import template
from django.urls import NoReverseMatch, reverse
from django.utils import timezone

from metering import selectors

register = template.Library()


def _link(name: str, query: str) -> str:
    try:
        return f"{reverse(name)}?{query}"
    except NoReverseMatch:
        return ""


@register.simple_tag(takes_context=True)
def support_numbers(context) -> dict[str, Any]:
    request = context.get("request")
    if request is None or not request.user.is_staff:
        return {}
    numbers = selectors.support_numbers()
    extra: dict[str, int] = {}
    try:
        from alerts.selectors import anomaly_flags_open

        extra["open_flags"] = anomaly_flags_open().count()
    except ImportError:
        pass
    try:
        from billing.selectors import overage_invoices

        stuck = timezone.now() - timedelta(hours=1)
        extra["failed_invoices"] = (overage_invoices().filter(state="failed").count()
                                    + overage_invoices().filter(state="started", created_at__lt=stuck).count())
    except ImportError:
        pass
    from djstripe.models import WebhookEventTrigger

    since = timezone.now() - timedelta(days=7)
    extra["failed_webhooks"] = WebhookEventTrigger.objects.filter(created__gte=since, valid=True, processed=False).count()
    return {
        "tokens_today": numbers.tokens_today, "requests_today": numbers.requests_today,
        "accounts_over_90": numbers.accounts_over_90, "overage_tokens": numbers.overage_tokens,
        "overage_accrued": numbers.overage_accrued, "extra": extra,
        "links": {"open_flags": _link("admin:alerts_anomalyflag_changelist", "status__exact=open"),
                  "failed_invoices": _link("admin:billing_overageinvoice_changelist", "state__exact=failed"),
                  "failed_webhooks": _link("admin:djstripe_webhookeventtrigger_changelist", "valid__exact=1&processed__exact=0")},
    }
