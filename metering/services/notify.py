"""Sending usage_recorded / usage_recorded_many for a changed period, from whichever
path changed it (the consume paths, staff corrections)."""
from __future__ import annotations

from datetime import datetime

from django.db import connection
from django.db.models.base import ModelState

from ..models import UsagePeriod
from ..signals import usage_recorded, usage_recorded_many

_PERIOD_FIELDS = {"id", "account_id", "starts_at", "ends_at", "token_limit", "cap", "overage_rate", "used",
                  "reserved", "closed_at", "updated_at"}
# period_after_update fills every column; a field added to UsagePeriod must be added there too.
assert {f.attname for f in UsagePeriod._meta.concrete_fields} == _PERIOD_FIELDS, "update period_after_update"


def period_after_update(row: tuple, now: datetime, alias: str | None = None) -> UsagePeriod:
    """The period as a raw UPDATE ... RETURNING left it (id, account_id, used, reserved,
    token_limit, cap, overage_rate, starts_at, ends_at), for usage_recorded's receivers:
    built as Model.from_db would, without __init__'s per-field work (1,000 periods a batch;
    pass `alias`, connection.alias, once for them all: each lookup goes through a local)."""
    pk, account_id, used, reserved, limit, cap, rate, starts_at, ends_at = row
    period = UsagePeriod.__new__(UsagePeriod)
    state = period._state = ModelState()
    state.adding, state.db = False, alias or connection.alias
    period.__dict__.update(id=pk, account_id=account_id, starts_at=starts_at, ends_at=ends_at, token_limit=limit,
                           cap=cap, overage_rate=rate, used=used, reserved=reserved, closed_at=None,
                           updated_at=now)
    return period


def notify_usage(period: UsagePeriod, used_before: int) -> None:
    usage_recorded.send(sender=UsagePeriod, period=period, used_before=used_before)


def notify_usages(changes: list[tuple[UsagePeriod, int]]) -> None:
    """Many periods at once (a batch): one send, not one per period."""
    if changes:
        usage_recorded_many.send(sender=UsagePeriod, changes=changes)
