"""Daily rollups of the ledger, built by a job and proved equal to it.

`ledger_rollup_refresh` reads the ledger past a watermark (ledger id) in batches
and adds each batch's sums to `DailyUsage`. Nothing here runs on the consume path.

Ids are taken at insert and become visible at commit, so a row with a lower id
may appear after a higher one was rolled up. Each run therefore remembers the ids
at or below its watermark it could not see (`pending_ids`) and looks for them
again next time; the selectors add those ids and everything past the watermark
live, so a reader never misses a committed row. `ledger_rollup_verify` compares
every group with the ledger itself and, asked to, repairs any that differ.
"""
from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone as dt_timezone
from typing import Any, Iterable

from django.conf import settings
from django.db import connection, transaction
from django.db.models import Count, Max, Min, Q, Sum
from django.db.models.functions import TruncDate
from django.utils import timezone

from ..models import DailyUsage, LedgerEntry, LedgerRollupState

logger = logging.getLogger(__name__)

GroupKey = tuple[int, int, date, str, str, str, str]  # account, period, day, kind, operation type, provider, model
GROUP_FIELDS = ("account_id", "period_id", "day", "kind", "operation_type", "provider", "model")


@dataclass(frozen=True)
class RollupRun:
    watermark_id: int
    rows_read: int
    groups_written: int
    pending: int
    dropped: int


def _state_locked() -> LedgerRollupState:
    if not LedgerRollupState.objects.filter(pk=1).exists():
        # Start just below the oldest row, so ids that never existed are not looked for.
        oldest = LedgerEntry.objects.aggregate(m=Min("id"))["m"]
        LedgerRollupState.objects.get_or_create(pk=1, defaults={"watermark_id": (oldest or 1) - 1})
    return LedgerRollupState.objects.select_for_update().get(pk=1)


def _oldest_open_transaction() -> datetime | None:
    """When the oldest transaction still open (other than ours) began, or None if
    there is none; on databases that cannot tell, a time one pending window ago."""
    if connection.vendor != "postgresql":
        return timezone.now() - timedelta(seconds=settings.ROLLUP_PENDING_SECONDS)
    with connection.cursor() as cursor:
        cursor.execute("SELECT min(xact_start), bool_or(xact_start IS NULL AND backend_type = 'client backend' "
                       "AND state <> 'idle') FROM pg_stat_activity WHERE pid <> pg_backend_pid() "
                       "AND datname = current_database()")
        oldest, unknown = cursor.fetchone()
    if unknown:  # sessions we may not look into: fall back to the time window
        return timezone.now() - timedelta(seconds=settings.ROLLUP_PENDING_SECONDS)
    return oldest


def _day(moment: datetime) -> date:
    return moment.astimezone(dt_timezone.utc).date()


def _add_rows(groups: dict[GroupKey, list[int]], rows: Iterable[dict[str, Any]]) -> None:
    for r in rows:
        key = (r["account_id"], r["period_id"], _day(r["created_at"]), r["kind"], r["operation_type"],
               r["provider"], r["model"])
        sums = groups[key]
        sums[0] += r["used_delta"]
        sums[1] += r["reserved_delta"]
        sums[2] += 1


def _write_groups(groups: dict[GroupKey, list[int]], *, replace: bool = False) -> int:
    """Add (or with `replace`, set) the sums of `groups` to DailyUsage. The caller
    holds the rollup lock, so nobody else writes these rows meanwhile."""
    if not groups:
        return 0
    existing: dict[GroupKey, DailyUsage] = {}
    if not replace:
        periods = {k[1] for k in groups}
        days = {k[2] for k in groups}
        for row in DailyUsage.objects.filter(period_id__in=periods, day__in=days):
            existing[(row.account_id, row.period_id, row.day, row.kind, row.operation_type, row.provider,
                      row.model)] = row
    objs = []
    for key, (used, reserved, entries) in groups.items():
        old = existing.get(key)
        if old is not None:
            used, reserved, entries = old.used_delta + used, old.reserved_delta + reserved, old.entries + entries
        objs.append(DailyUsage(**dict(zip(GROUP_FIELDS, key)), used_delta=used, reserved_delta=reserved,
                               entries=entries))
    DailyUsage.objects.bulk_create(objs, batch_size=2000, update_conflicts=True, unique_fields=list(GROUP_FIELDS),
                                   update_fields=["used_delta", "reserved_delta", "entries"])
    return len(objs)


_ROW_FIELDS = ("id", "account_id", "period_id", "created_at", "kind", "operation_type", "provider", "model",
               "used_delta", "reserved_delta")


def ledger_rollup_refresh_batch(*, batch_size: int | None = None, now: datetime | None = None) -> RollupRun:
    """Roll up the next `batch_size` ledger ids past the watermark, plus any
    pending ids that have become visible. One transaction; safe to run twice or
    concurrently (runs queue on the state row's lock)."""
    batch_size = batch_size or settings.ROLLUP_BATCH_SIZE
    now = now or timezone.now()
    with transaction.atomic():
        state = _state_locked()
        low = state.watermark_id
        pending: dict[str, str] = dict(state.pending_ids or {})
        # Read before our rows: a transaction that had ended by now is in what we read next.
        open_since = _oldest_open_transaction() if pending else None
        newest = LedgerEntry.objects.aggregate(m=Max("id"))["m"] or 0
        high = min(newest, low + batch_size)
        condition = Q(id__gt=low, id__lte=high)
        if pending:
            condition |= Q(id__in=[int(i) for i in pending])
        # One query reads the rows, so the ids we saw are exactly the ids we add up.
        rows = list(LedgerEntry.objects.filter(condition).order_by().values(*_ROW_FIELDS))
        groups: dict[GroupKey, list[int]] = defaultdict(lambda: [0, 0, 0])
        _add_rows(groups, rows)
        written = _write_groups(groups)
        seen = {r["id"] for r in rows}
        for i in seen:
            pending.pop(str(i), None)
        # A pending id whose transaction must have ended before our read (every open
        # transaction began after the id was first missed) was rolled back: drop it.
        # Past the window, drop it anyway; ledger_rollup_verify repairs a late one.
        give_up = now - timedelta(seconds=settings.ROLLUP_PENDING_SECONDS)
        dropped = [i for i, first in pending.items()
                   if datetime.fromisoformat(first) < give_up
                   or (open_since is None or datetime.fromisoformat(first) < open_since)]
        for i in dropped:
            del pending[i]
        # Stamped after the read: whatever took a missing id had begun before this.
        stamp = max(now, timezone.now()).isoformat()
        for i in range(low + 1, high + 1):
            if i not in seen:
                pending[str(i)] = stamp
        if dropped:
            logger.info("ledger rollup: %d id(s) never appeared (rolled back): %s", len(dropped), dropped[:20])
        state.watermark_id = high
        state.pending_ids = pending
        # Readers bound the live slice by time only after a run that read everything
        # visible: past a partial run's watermark lie rows of any age.
        state.refreshed_at = now if high >= newest else None
        state.save(update_fields=["watermark_id", "pending_ids", "refreshed_at"])
    return RollupRun(high, len(rows), written, len(pending), len(dropped))


def ledger_rollup_refresh(*, batch_size: int | None = None, max_batches: int = 1000,
                          now: datetime | None = None) -> RollupRun:
    """Catch the rollups up with the ledger, batch by batch (each batch commits)."""
    total_rows = total_groups = 0
    run = ledger_rollup_refresh_batch(batch_size=batch_size, now=now)
    total_rows, total_groups = run.rows_read, run.groups_written
    for _ in range(max_batches - 1):
        newest = LedgerEntry.objects.aggregate(m=Max("id"))["m"] or 0
        if run.watermark_id >= newest:
            break
        run = ledger_rollup_refresh_batch(batch_size=batch_size, now=now)
        total_rows += run.rows_read
        total_groups += run.groups_written
    return RollupRun(run.watermark_id, total_rows, total_groups, run.pending, run.dropped)


@dataclass(frozen=True)
class RollupDrift:
    key: GroupKey
    ledger: tuple[int, int, int]
    rollup: tuple[int, int, int]


def _ledger_groups(qs) -> dict[GroupKey, tuple[int, int, int]]:
    out = {}
    for r in (qs.annotate(day=TruncDate("created_at", tzinfo=dt_timezone.utc)).order_by()
              .values("account_id", "period_id", "day", "kind", "operation_type", "provider", "model")
              .annotate(u=Sum("used_delta"), r=Sum("reserved_delta"), n=Count("id"))):
        out[(r["account_id"], r["period_id"], r["day"], r["kind"], r["operation_type"], r["provider"],
             r["model"])] = (r["u"], r["r"], r["n"])
    return out


def ledger_rollup_verify(*, account_id: int | None = None, repair: bool = False) -> list[RollupDrift]:
    """Prove DailyUsage equals the ledger it has read (every id at or below the
    watermark that is not pending), group by group. Returns the groups that
    differ; with `repair`, rewrites them from the ledger. Holds the rollup lock,
    so refreshes wait meanwhile."""
    with transaction.atomic():
        state = _state_locked()
        ledger_qs = LedgerEntry.objects.filter(id__lte=state.watermark_id).exclude(
            id__in=[int(i) for i in (state.pending_ids or {})])
        rollup_qs = DailyUsage.objects.all()
        if account_id is not None:
            ledger_qs = ledger_qs.filter(account_id=account_id)
            rollup_qs = rollup_qs.filter(account_id=account_id)
        truth = _ledger_groups(ledger_qs)
        rolled = {(r.account_id, r.period_id, r.day, r.kind, r.operation_type, r.provider, r.model):
                  (r.used_delta, r.reserved_delta, r.entries) for r in rollup_qs}
        drifts = [RollupDrift(key, truth.get(key, (0, 0, 0)), rolled.get(key, (0, 0, 0)))
                  for key in sorted(set(truth) | set(rolled), key=str)
                  if truth.get(key, (0, 0, 0)) != rolled.get(key, (0, 0, 0))]
        if repair and drifts:
            stale = [d.key for d in drifts if d.key not in truth]
            for key in stale:
                DailyUsage.objects.filter(**dict(zip(GROUP_FIELDS, key))).delete()
            _write_groups({d.key: list(truth[d.key]) for d in drifts if d.key in truth}, replace=True)
            logger.warning("ledger rollup: repaired %d group(s)", len(drifts))
        if account_id is None:
            state.verified_at = timezone.now()
            state.save(update_fields=["verified_at"])
    return drifts
