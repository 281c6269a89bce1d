"""Numbers for people: thousands separators, dollars with cents, signed deltas."""
from __future__ import annotations

from decimal import ROUND_HALF_UP, Decimal, InvalidOperation

from django import template

register = template.Library()


@register.filter
def thousands(value) -> str:
    """12345 -> "12,345"; leaves anything that is not a number as it is."""
    try:
        number = int(value)
    except (TypeError, ValueError):
        return "" if value is None else str(value)
    return f"{number:,}"


@register.filter
def signed(value) -> str:
    """A ledger delta: "+1,200", "−300" (a real minus sign), "0"."""
    try:
        number = int(value)
    except (TypeError, ValueError):
        return "" if value is None else str(value)
    if number > 0:
        return f"+{number:,}"
    return f"\u2212{-number:,}" if number < 0 else "0"


@register.filter
def usd(value) -> str:
    """Decimal dollars to "$1,234.57" (rounded half-up to the cent)."""
    try:
        amount = Decimal(str(value)).quantize(Decimal("0.01"), ROUND_HALF_UP)
    except (InvalidOperation, ValueError, TypeError):
        return ""
    sign = "\u2212" if amount < 0 else ""
    return f"{sign}${abs(amount):,.2f}"


@register.filter
def cents_usd(value) -> str:
    """Integer cents to "$29.00"."""
    try:
        return usd(Decimal(int(value)) / 100)
    except (TypeError, ValueError):
        return ""


@register.filter
def percent(value) -> str:
    try:
        return f"{float(value):,.1f}%"
    except (TypeError, ValueError):
        return ""


@register.filter
def rate(value) -> str:
    """A per-token rate without trailing zeros: Decimal("0.001000") -> "$0.001"."""
    try:
        amount = Decimal(str(value)).normalize()
    except (InvalidOperation, ValueError, TypeError):
        return ""
    return f"${amount:f}"
