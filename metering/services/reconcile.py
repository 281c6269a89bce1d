"""Proving the counters are a faithful cache of the ledger, and that no period passes
its cap: `used + reserved <= cap` now, and at every consumption the ledger recorded."""
from __future__ import annotations

from dataclasses import dataclass, field

from django.db.models import BigIntegerField, Exists, F, OuterRef, Sum
from django.db.models.fields.json import KT
from django.db.models.functions import Cast, Coalesce

from ..models import LedgerEntry, UsagePeriod


@dataclass(frozen=True)
class Drift:
    period_id: int
    user_id: int
    used: int
    ledger_used: int
    reserved: int
    ledger_reserved: int


@dataclass(frozen=True)
class OverCap:
    """A period whose counters grant more than its cap: used + reserved > cap."""

    period_id: int
    user_id: int
    used: int
    reserved: int
    cap: int


@dataclass(frozen=True)
class CapPassed:
    """A consumption whose answer showed its period past the cap: the usage it stored
    (used + reserved right after it) was more than the cap then. The period passed its
    cap at that moment, whatever its counters say now."""

    entry_id: int
    period_id: int
    user_id: int
    operation_id: str
    used: int
    reserved: int
    cap: int


@dataclass(frozen=True)
class Reconciliation:
    drifts: list[Drift] = field(default_factory=list)
    over_cap: list[OverCap] = field(default_factory=list)
    passed_cap: list[CapPassed] = field(default_factory=list)

    @property
    def count(self) -> int:
        return len(self.drifts) + len(self.over_cap) + len(self.passed_cap)

    def __bool__(self) -> bool:
        return self.count > 0

    def summary(self) -> str:
        parts = []
        if self.drifts:
            parts.append(f"Ledger drift in {len(self.drifts)} period(s)")
        if self.over_cap:
            parts.append(f"{len(self.over_cap)} period(s) over their cap")
        if self.passed_cap:
            parts.append(f"{len(self.passed_cap)} consumption(s) past their period's cap")
        return "; ".join(parts) or "Every period's counters equal its ledger and stay within its cap"


def ledger_reconcile(*, periods=None) -> list[Drift]:
    """Every period whose counters differ from the sum of its ledger rows."""
    qs = (periods if periods is not None else UsagePeriod.objects.all()).annotate(
        ledger_used=Coalesce(Sum("ledger__used_delta"), 0),
        ledger_reserved=Coalesce(Sum("ledger__reserved_delta"), 0),
    ).values_list("pk", "account__user_id", "used", "ledger_used", "reserved", "ledger_reserved")
    return [Drift(*row) for row in qs.iterator(chunk_size=2000) if row[2] != row[3] or row[4] != row[5]]


def periods_over_cap(*, periods=None) -> list[OverCap]:
    """Every period whose counters say used + reserved > cap (the cap is in every consume's
    and reserve's UPDATE, and a lowered cap never drops below what was granted, so none should)."""
    qs = (periods if periods is not None else UsagePeriod.objects.all()).filter(used__gt=F("cap") - F("reserved"))
    return [OverCap(*row) for row in qs.order_by("pk").values_list("pk", "account__user_id", "used", "reserved", "cap")]


def _stored(figure: str) -> Coalesce:
    """A figure of the usage a consumption's ledger row stored with its answer: under "usage"
    from the ORM paths, raw under "usageAfter" from the PostgreSQL statements
    (contract.stored_body reads both)."""
    return Coalesce(Cast(KT(f"response__usage__{figure}"), BigIntegerField()),
                    Cast(KT(f"response__usageAfter__{figure}"), BigIntegerField()))


def consumptions_past_cap() -> list[CapPassed]:
    """Every consumption whose stored answer shows its period past the cap (used + reserved
    > cap right after it): a period that passed its cap, even if its counters no longer show it."""
    rows = (LedgerEntry.objects.filter(kind=LedgerEntry.Kind.CONSUMPTION, response__isnull=False)
            .annotate(s_used=_stored("used"), s_reserved=_stored("reserved"), s_cap=_stored("cap"))
            .filter(s_used__gt=F("s_cap") - F("s_reserved")).order_by("pk")
            .values_list("pk", "period_id", "account__user_id", "operation_id", "s_used", "s_reserved", "s_cap"))
    return [CapPassed(*row) for row in rows.iterator(chunk_size=2000)]


def reconcile() -> Reconciliation:
    """Counters vs ledger, and the caps now and at every consumption, for every period."""
    return Reconciliation(drifts=ledger_reconcile(), over_cap=periods_over_cap(), passed_cap=consumptions_past_cap())


def ledger_misattributed() -> list[int]:
    """Ledger rows whose period is missing, or whose account is not their period's account
    (ids, at most 100). PostgreSQL checks neither (models.py says why): this is the check
    that stands in for those constraints."""
    own_period = UsagePeriod.objects.filter(pk=OuterRef("period_id"), account_id=OuterRef("account_id"))
    return list(LedgerEntry.objects.filter(~Exists(own_period)).order_by("id").values_list("id", flat=True)[:100])
