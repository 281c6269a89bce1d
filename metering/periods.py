"""Where a new usage period starts and ends.

The default is the calendar month in UTC. Billing registers a function that
aligns periods to the account's Stripe subscription; metering only asks.
"""
from __future__ import annotations

from datetime import datetime, timezone as dt_timezone
from typing import Callable, Optional

Bounds = tuple[datetime, datetime]
_bounds_functions: list[Callable[[object, datetime], Optional[Bounds]]] = []


def register_period_bounds(func: Callable[[object, datetime], Optional[Bounds]]) -> None:
    """func(account, now) returns (start, end) containing `now`, or None to pass."""
    if func not in _bounds_functions:
        _bounds_functions.append(func)


def calendar_month(now: datetime) -> Bounds:
    now = now.astimezone(dt_timezone.utc)
    start = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    end = start.replace(year=start.year + 1, month=1) if start.month == 12 else start.replace(month=start.month + 1)
    return start, end


def bounds_for(account: object, now: datetime) -> Bounds:
    for func in _bounds_functions:
        bounds = func(account, now)
        if bounds is not None:
            return bounds
    return calendar_month(now)
