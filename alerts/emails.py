"""Turning a recorded alert into an e-mail (text and HTML from templates/emails/).

Figures are read when the e-mail is built, so a notice delayed by an outage
shows where the user stands now; what was true at the crossing stays on the
AlertEvent's `context`."""
from __future__ import annotations

from datetime import timedelta
from decimal import Decimal
from typing import Any

from django.core.mail import EmailMultiAlternatives
from django.template.loader import render_to_string

from metering.models import UsagePeriod
from metering.services import Usage

from .models import AlertEvent
from .selectors import (
    PREFERENCE_LABELS,
    busiest_operation_types,
    change_percentage,
    period_usage,
    previous_period,
    tokens_consumed_between,
)
from .unsubscribe import dashboard_url, unsubscribe_url

# Which preference switches each kind off; kinds not listed are billing-critical.
PREFERENCE_FOR_KIND = {
    AlertEvent.Kind.THRESHOLD: "usage_alerts",
    AlertEvent.Kind.WEEKLY_DIGEST: "weekly_digest",
    AlertEvent.Kind.PERIOD_SUMMARY: "period_summary",
}


def usd(amount: Decimal) -> str:
    """Cents at least, more digits when the amount has them: $0.60, $1.234."""
    amount = Decimal(amount).normalize()
    if amount.as_tuple().exponent > -2:
        amount = amount.quantize(Decimal("0.01"))
    return f"${amount:f}"


def usage_figures(usage: Usage) -> dict[str, Any]:
    """The numbers the dashboard shows, formatted once for both templates."""
    return {
        "tier": usage.tier or "no tier",
        "used": f"{usage.used:,}",
        "limit": f"{usage.limit:,}",
        "remaining": f"{usage.remaining:,}",
        "reserved": f"{usage.reserved:,}",
        "cap": f"{usage.cap:,}",
        "percentage": f"{usage.percentage:g}",
        "status": usage.status,
        "overage_tokens": f"{usage.overage_tokens:,}",
        "overage_charge": usd(usage.overage_charge),
        "overage_rate": usd(usage.overage_rate),
        "in_overage": usage.overage_tokens > 0,
        "overage_allowed": usage.cap > usage.limit,
        "period_start": usage.period_start,
        "period_end": usage.period_end,
        "period_last_day": usage.period_end - timedelta(seconds=1),
    }


def _summary_context(period: UsagePeriod, usage: Usage) -> dict[str, Any]:
    before = previous_period(period)
    context: dict[str, Any] = {"busiest": busiest_operation_types(period), "previous": None}
    if before is not None:
        previous = period_usage(before)
        context["previous"] = {
            "used": f"{previous.used:,}", "limit": f"{previous.limit:,}", "percentage": f"{previous.percentage:g}",
            "overage_charge": usd(previous.overage_charge), "change": change_percentage(usage.used, previous.used),
            "period_start": previous.period_start, "period_last_day": previous.period_end - timedelta(seconds=1),
        }
    return context


def _digest_context(event: AlertEvent, usage: Usage) -> dict[str, Any]:
    now = event.created_at
    week_tokens = tokens_consumed_between(account_id=event.account_id, since=now - timedelta(days=7), until=now)
    elapsed = max((now - usage.period_start).total_seconds(), 3600.0)
    length = (usage.period_end - usage.period_start).total_seconds()
    projected = int(usage.used * length / elapsed) if now < usage.period_end else usage.used
    return {"week_tokens": f"{week_tokens:,}", "projected": f"{projected:,}",
            "projected_over": projected > usage.limit, "days_left": max(0, (usage.period_end - now).days)}


def _subject(event: AlertEvent, figures: dict[str, Any]) -> str:
    if event.kind == AlertEvent.Kind.THRESHOLD:
        if event.threshold >= 100:
            return f"You have used all {figures['limit']} included tokens this period"
        return f"You have used {event.threshold}% of your tokens this period"
    if event.kind == AlertEvent.Kind.OVERAGE:
        return (f"Overage: {figures['overage_tokens']} tokens past your limit, "
                f"{figures['overage_charge']} so far")
    if event.kind == AlertEvent.Kind.PERIOD_SUMMARY:
        return (f"Your usage summary for {figures['period_start']:%b %-d} – {figures['period_last_day']:%b %-d, %Y}: "
                f"{figures['used']} tokens")
    return f"Weekly usage digest: {figures['percentage']}% of your tokens used"


def email_for_event(event: AlertEvent) -> EmailMultiAlternatives:
    period = event.period
    usage = period_usage(period)
    figures = usage_figures(usage)
    user = period.account.user
    preference = PREFERENCE_FOR_KIND.get(event.kind)
    context: dict[str, Any] = {
        "event": event, "user": user, "name": user.get_short_name() or user.get_username(), "u": figures,
        "dashboard_url": dashboard_url(), "preference": preference,
        "preference_label": PREFERENCE_LABELS.get(preference or "", ""),
        "unsubscribe_url": unsubscribe_url(user_id=user.pk, preference=preference) if preference else "",
    }
    if event.kind == AlertEvent.Kind.PERIOD_SUMMARY:
        context.update(_summary_context(period, usage))
    elif event.kind == AlertEvent.Kind.WEEKLY_DIGEST:
        context.update(_digest_context(event, usage))
    context["subject"] = subject = _subject(event, figures)
    text = render_to_string(f"emails/{event.kind}.txt", context)
    html = render_to_string(f"emails/{event.kind}.html", context)
    headers = {"X-Alert-Id": str(event.pk)}
    if preference:
        # RFC 8058 one-click unsubscribe: mail clients POST to the same link.
        headers["List-Unsubscribe"] = f"<{context['unsubscribe_url']}>"
        headers["List-Unsubscribe-Post"] = "List-Unsubscribe=One-Click"
    message = EmailMultiAlternatives(subject=subject, body=text, to=[event.recipient], headers=headers)
    message.attach_alternative(html, "text/html")
    return message
