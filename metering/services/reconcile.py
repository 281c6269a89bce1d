"""Proving the counters are a faithful cache of the ledger."""
from __future__ import annotations

from dataclasses import dataclass

from django.db.models import Exists, OuterRef, Sum
from django.db.models.functions import Coalesce

from ..models import LedgerEntry, UsagePeriod


@dataclass(frozen=True)
class Drift:
    period_id: int
    user_id: int
    used: int
    ledger_used: int
    reserved: int
    ledger_reserved: int


def ledger_reconcile(*, periods=None) -> list[Drift]:
    """Every period whose counters differ from the sum of its ledger rows."""
    qs = (periods if periods is not None else UsagePeriod.objects.all()).annotate(
        ledger_used=Coalesce(Sum("ledger__used_delta"), 0),
        ledger_reserved=Coalesce(Sum("ledger__reserved_delta"), 0),
    ).values_list("pk", "account__user_id", "used", "ledger_used", "reserved", "ledger_reserved")
    return [Drift(*row) for row in qs.iterator(chunk_size=2000) if row[2] != row[3] or row[4] != row[5]]


def ledger_misattributed() -> list[int]:
    """Ledger rows whose period is missing, or whose account is not their period's account
    (ids, at most 100). PostgreSQL checks neither (models.py says why): this is the check
    that stands in for those constraints."""
    own_period = UsagePeriod.objects.filter(pk=OuterRef("period_id"), account_id=OuterRef("account_id"))
    return list(LedgerEntry.objects.filter(~Exists(own_period)).order_by("id").values_list("id", flat=True)[:100])
