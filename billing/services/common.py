"""What the billing services share: Stripe data helpers, money rounding, errors."""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta, timezone as dt_timezone
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

from consensus_tokens.errors import ApplicationError
from metering.models import Account, Tier

# The events our webhook endpoint asks Stripe for.
WEBHOOK_EVENTS = [
    "customer.subscription.created",
    "customer.subscription.updated",
    "customer.subscription.deleted",
    "invoice.payment_succeeded",
    "invoice.payment_failed",
    "invoice.upcoming",
    "customer.updated",
]
CURRENCY = "usd"
INTERVALS = ("month", "year")


class AlreadySubscribed(ApplicationError):
    status, code = 409, "already_subscribed"


class UnknownTier(ApplicationError):
    status, code = 400, "unknown_tier"


class PriceNotSetUp(ApplicationError):
    status, code = 503, "price_not_set_up"


def ts_to_datetime(value: Any) -> datetime | None:
    return datetime.fromtimestamp(int(value), tz=dt_timezone.utc) if value else None


def epoch(value: datetime) -> int:
    return int(value.timestamp())


def stripe_id(value: Any) -> str:
    if isinstance(value, dict):
        return str(value.get("id") or "")
    return str(value or "")


def time_bucket(now: datetime, seconds: int) -> int:
    return int(now.timestamp()) // seconds


def add_months(moment: datetime, months: int) -> datetime:
    """`moment` plus whole months, the day clamped to the month's length (Jan 31 + 1 = Feb 28/29),
    as Stripe does for monthly billing anchors."""
    month0 = moment.month - 1 + months
    year, month = moment.year + month0 // 12, month0 % 12 + 1
    next_first = datetime(year + (month // 12), month % 12 + 1, 1, tzinfo=moment.tzinfo)
    last_day = (next_first - timedelta(days=1)).day
    return moment.replace(year=year, month=month, day=min(moment.day, last_day))


def billing_period_at(*, start: datetime, end: datetime, interval: str, now: datetime) -> tuple[datetime, datetime]:
    """Stripe's billing period [start, end) or, once `now` has passed its end and the renewal
    is not confirmed yet, the one Stripe will renew into (rolled forward from `end` by the
    interval; the renewal webhook then confirms it)."""
    step = 12 if interval == "year" else 1
    first_end, n = end, 0
    while end <= now:
        n += 1
        start, end = end, add_months(first_end, step * n)
    return start, end


def usage_month(*, start: datetime, end: datetime, interval: str, now: datetime) -> tuple[datetime, datetime]:
    """The usage period containing `now` in the billing period [start, end): allowances are
    monthly whatever the billing interval, so a yearly period is cut into months anchored on
    its start (the last one ends with it); a monthly billing period is one usage period, however
    long Stripe made it. Before `start`, the first month."""
    if interval != "year":
        return start, end
    k = 0
    while add_months(start, k + 1) <= now and add_months(start, k + 1) < end:
        k += 1
    return add_months(start, k), min(add_months(start, k + 1), end)


def overage_cents(tokens: int, rate: Decimal) -> int:
    """tokens × rate in USD, to integer cents, rounded half-up (once, for the whole period)."""
    return int((Decimal(tokens) * Decimal(rate) * 100).quantize(Decimal(1), rounding=ROUND_HALF_UP))


def tier_rank(tier: Tier | None) -> tuple[int, int]:
    if tier is None:
        return (-1, -1)
    return (tier.monthly_token_limit, tier.monthly_price_cents)


@dataclass(frozen=True)
class SubscriptionState:
    """What Stripe says about a subscription, in both the current API format (the period
    on the subscription item) and the older one (the period on the subscription)."""

    id: str
    customer_id: str
    status: str
    price_id: str
    interval: str
    period_start: datetime | None
    period_end: datetime | None
    cancel_at_period_end: bool
    ended_at: datetime | None

    @classmethod
    def from_stripe(cls, data: dict[str, Any]) -> SubscriptionState:
        items = (data.get("items") or {}).get("data") or []
        item = items[0] if items else {}
        price = item.get("price") or data.get("plan") or {}
        recurring = price.get("recurring") or {}
        start = item.get("current_period_start") or data.get("current_period_start")
        end = item.get("current_period_end") or data.get("current_period_end")
        return cls(id=data["id"], customer_id=stripe_id(data.get("customer")), status=data.get("status") or "",
                   price_id=stripe_id(price), interval=recurring.get("interval") or price.get("interval") or "",
                   period_start=ts_to_datetime(start), period_end=ts_to_datetime(end),
                   cancel_at_period_end=bool(data.get("cancel_at_period_end")), ended_at=ts_to_datetime(data.get("ended_at")))


ACCOUNT_STATUS = {
    "active": Account.Status.ACTIVE,
    "trialing": Account.Status.TRIALING,
    "past_due": Account.Status.PAST_DUE,
    "unpaid": Account.Status.PAST_DUE,
    "paused": Account.Status.PAST_DUE,
    "canceled": Account.Status.CANCELED,
}
