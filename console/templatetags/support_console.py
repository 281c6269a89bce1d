"""The admin landing page's numbers (templates/admin/index.html)."""
from __future__ import annotations

from typing import Any

from django import template
from django.urls import NoReverseMatch, reverse

from console import selectors

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
    return {
        "tokens_today": numbers.tokens_today, "requests_today": numbers.requests_today,
        "accounts_over_90": numbers.accounts_over_90, "overage_tokens": numbers.overage_tokens,
        "overage_accrued": numbers.overage_accrued, "extra": numbers.extra,
        "links": {"open_flags": _link("admin:alerts_anomalyflag_changelist", "status__exact=open"),
                  "failed_invoices": _link("admin:billing_overageinvoice_changelist", "state__exact=failed"),
                  "failed_webhooks": _link("admin:djstripe_webhookeventtrigger_changelist", "valid__exact=1&processed__exact=0")},
    }
