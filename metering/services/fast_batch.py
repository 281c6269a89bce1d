"""A batch of fresh consumes on PostgreSQL in a fixed number of set-based
statements (array parameters, binary encoded), whatever its size. Same rules as
the ORM path in batch.py, which answers whenever this returns None."""
from __future__ import annotations

from collections import defaultdict
from datetime import datetime
from decimal import Decimal
from typing import Any

import psycopg
from django.db import connection, transaction
from django.utils import timezone

from .batch import MAX_BATCH, BatchItemResult
from .context import RequestContext
from .usage import ConsumeRequest, _notify_usages, format_usd, period_after_update, usage_status

# One read: each user's account, tier and current period, and whether every
# operation type and provider named is known and active (evaluated once, not per row).
_BATCH_LOOKUP = """
SELECT u.user_id, a.id, t.slug, per.id,
       (SELECT count(*) FROM metering_operationtype WHERE active AND slug = ANY(%(op_types)b::text[])),
       (SELECT count(*) FROM metering_provider WHERE active AND slug = ANY(%(providers)b::text[]))
FROM unnest(%(user_ids)b::bigint[]) AS u(user_id)
JOIN metering_account a ON a.user_id = u.user_id
LEFT JOIN metering_tier t ON t.id = a.tier_id
LEFT JOIN LATERAL (
    SELECT p.id FROM metering_usageperiod p
    WHERE p.account_id = a.id AND p.starts_at <= %(now)s AND p.ends_at > %(now)s
    ORDER BY p.starts_at DESC LIMIT 1
) per ON true
"""

_BATCH_LOCK = "SELECT id FROM metering_usageperiod WHERE id = ANY(%(ids)b::bigint[]) ORDER BY id FOR UPDATE"

_BATCH_UPDATE = """
UPDATE metering_usageperiod p SET used = p.used + d.delta, updated_at = %(now)s
FROM unnest(%(ids)b::bigint[], %(deltas)b::bigint[]) AS d(id, delta)
WHERE p.id = d.id AND p.used + p.reserved + d.delta <= p.cap
RETURNING p.id, p.account_id, p.used, p.reserved, p.token_limit, p.cap, p.overage_rate, p.starts_at, p.ends_at
"""

# No check beforehand that the operation ids are new: ledger_one_consumption_per_operation
# refuses a recorded one here (IntegrityError, everything rolls back) and the ORM path
# answers the replay or conflict. A probe before would cost every fresh batch as much as
# the index's own check does.
# Each row stores the usage right after it raw, as fast_consume.py does (a replay formats
# it with usage.stored_body), from the period as this transaction's UPDATE left it: no
# answer is built or encoded while the periods are locked.
_BATCH_LEDGER = """
INSERT INTO metering_ledgerentry
    (account_id, period_id, kind, used_delta, reserved_delta, operation_id, operation_type, provider, model,
     estimated_tokens, actual_tokens, service_key_id, actor, reason, fingerprint, response, created_at)
SELECT x.account_id, x.period_id, 'consumption', x.tokens, 0, x.operation_id, x.operation_type, x.provider,
       x.model, x.estimated_tokens, x.tokens, %(service_key_id)s, '', '', x.fingerprint,
       jsonb_build_object('recordedAt', %(now)s::timestamptz, 'usageAfter', jsonb_build_object(
           'tier', NULLIF(x.tier, ''), 'limit', p.token_limit, 'used', x.used_after, 'reserved', p.reserved,
           'cap', p.cap, 'overageRate', p.overage_rate::text, 'periodStart', p.starts_at, 'periodEnd', p.ends_at)),
       %(now)s
FROM unnest(%(account_ids)b::bigint[], %(period_ids)b::bigint[], %(tokens)b::bigint[], %(operation_ids)b::text[],
            %(operation_types)b::text[], %(providers)b::text[], %(models)b::text[], %(estimated)b::int[],
            %(fingerprints)b::text[], %(used_after)b::bigint[], %(tiers)b::text[])
     AS x(account_id, period_id, tokens, operation_id, operation_type, provider, model, estimated_tokens,
          fingerprint, used_after, tier)
JOIN metering_usageperiod p ON p.id = x.period_id
RETURNING id, account_id, operation_id
"""

# Audit rows need nothing from the locked periods, so they go in before the locks are taken.
_BATCH_AUDIT = """
INSERT INTO metering_auditlog
    (user_id, action, tokens, operation_type, operation_id, result, client_ip, user_agent, service_key_id,
     actor, request_id, detail, created_at)
SELECT x.user_id, 'consume', x.tokens, x.operation_type, x.operation_id, 'recorded', %(client_ip)s,
       %(user_agent)s, %(service_key_id)s, %(actor)s, %(request_id)s, '{"batch": true}', %(now)s
FROM unnest(%(user_ids)b::bigint[], %(tokens)b::bigint[], %(operation_types)b::text[], %(operation_ids)b::text[])
     AS x(user_id, tokens, operation_type, operation_id)
"""


class _NotFast(Exception):
    """Raised inside the transaction to roll it back and leave the batch to the ORM path."""


def consume_batch_fast(*, requests: list[ConsumeRequest], ctx: RequestContext) -> list[BatchItemResult] | None:
    """A batch of fresh operations for users with open periods, none past its cap,
    in a fixed number of statements whatever its size (one read; then in one
    transaction: audit rows, period locks, one update, ledger rows).

    Returns None, having changed nothing, for anything else - an unknown user,
    operation type or provider, a duplicate, a reservation, a user without an
    account or period yet, a cap - and the ORM path in batch.py answers, refusals
    included. A replayed or conflicting operation id raises IntegrityError (nothing
    kept), and the ORM path answers that too.
    """
    if not requests or len(requests) > MAX_BATCH:
        return None
    if len({(r.user_id, r.operation_id) for r in requests}) != len(requests) or any(r.reservation_id for r in requests):
        return None
    now = timezone.now()
    connection.close_if_health_check_failed()
    connection.ensure_connection()
    with connection.wrap_database_errors, psycopg.Cursor(connection.connection) as cursor:
        user_ids = sorted({r.user_id for r in requests})
        op_types = sorted({r.operation_type for r in requests})
        providers = sorted({r.provider for r in requests if r.provider})
        cursor.execute(_BATCH_LOOKUP, {"user_ids": user_ids, "now": now, "op_types": op_types,
                                       "providers": providers}, prepare=True)
        rows = cursor.fetchall()
        if (len(rows) != len(user_ids) or rows[0][4] != len(op_types) or rows[0][5] != len(providers)
                or any(row[3] is None for row in rows)):
            return None
        found = {user_id: (account_id, tier_slug, period_id) for user_id, account_id, tier_slug, period_id, _, _ in rows}
        columns = {
            "account_ids": [found[r.user_id][0] for r in requests],
            "period_ids": [found[r.user_id][2] for r in requests],
            "tokens": [r.tokens for r in requests],
            "operation_ids": [r.operation_id for r in requests],
            "operation_types": [r.operation_type for r in requests],
            "providers": [r.provider for r in requests],
            "models": [r.model for r in requests],
            "estimated": [r.estimated_tokens for r in requests],
            "fingerprints": [r.fingerprint() for r in requests],
            "user_ids": [r.user_id for r in requests],
            "service_key_id": ctx.service_key_id, "now": now, "client_ip": ctx.client_ip,
            "user_agent": (ctx.user_agent or "")[:300], "actor": ctx.actor, "request_id": ctx.request_id,
        }
        delta: dict[int, int] = defaultdict(int)
        for period_id, tokens in zip(columns["period_ids"], columns["tokens"]):
            delta[period_id] += tokens
        period_ids = sorted(delta)
        # Foreign keys are checked at commit (Django makes them deferred), which is
        # inside the window where the periods are locked; checked as each statement
        # ends instead, the audit rows' checks happen before the locks. Only in a
        # transaction of our own: in an outer one this would change its checks too.
        check_now = not connection.in_atomic_block
        try:
            with transaction.atomic():
                if check_now:
                    cursor.execute("SET CONSTRAINTS ALL IMMEDIATE")
                cursor.execute(_BATCH_AUDIT, columns, prepare=True)
                # Lock in id order, so concurrent batches cannot deadlock; the UPDATE
                # skips any period the batch would take past its cap. From here to the
                # commit other writers to these users wait: keep it short.
                cursor.execute(_BATCH_LOCK, {"ids": period_ids}, prepare=True)
                cursor.execute(_BATCH_UPDATE, {"ids": period_ids, "deltas": [delta[p] for p in period_ids],
                                               "now": now}, prepare=True, binary=True)
                # binary results: psycopg's C loaders for the 2,000 timestamps and 1,000 rates
                after = {row[0]: row for row in cursor.fetchall()}
                if len(after) != len(period_ids):
                    raise _NotFast  # a cap: the ORM path names the item
                used_after, entry_ids = _batch_record(cursor, columns, found, after, delta)
        except _NotFast:
            return None
    # the answers after the commit: the periods' locks are held no longer than the statements need
    return _answers(requests, columns, found, after, used_after, entry_ids)


def _batch_record(cursor, columns: dict, found, after,
                  delta: dict[int, int]) -> tuple[list[int], dict[tuple[int, str], int]]:
    """The ledger rows (each item's period `used` right after it, and the rows' ids),
    then usage_recorded_many for the periods, inside the transaction as the alerts need."""
    running = {pk: row[2] - delta[pk] for pk, row in after.items()}
    used_after = []
    for period_id, tokens in zip(columns["period_ids"], columns["tokens"]):
        used = running[period_id] = running[period_id] + tokens
        used_after.append(used)
    tiers = [found[user_id][1] or "" for user_id in columns["user_ids"]]
    cursor.execute(_BATCH_LEDGER, {**columns, "used_after": used_after, "tiers": tiers}, prepare=True)
    entry_ids = {(account_id, operation_id): pk for pk, account_id, operation_id in cursor.fetchall()}
    _notify_usages([(period_after_update(row, columns["now"]), row[2] - delta[pk]) for pk, row in after.items()])
    return used_after, entry_ids


def _answers(requests: list[ConsumeRequest], columns: dict, found, after, used_after: list[int],
             entry_ids: dict[tuple[int, str], int]) -> list[BatchItemResult]:
    """consume_response for each item, as a replay (usage.stored_body) will answer it."""
    recorded_at = _api_time(columns["now"])
    tiers = {period_id: tier_slug for _, tier_slug, period_id in found.values()}
    shared: dict[Any, str] = {}  # periods mostly share their bounds and rate: format each once
    figures = {pk: _PeriodFigures(tiers[pk], row, shared) for pk, row in after.items()}
    results = []
    for i, (r, account_id, period_id, used) in enumerate(zip(requests, columns["account_ids"], columns["period_ids"],
                                                             used_after)):
        body = {"operationId": r.operation_id, "tokens": r.tokens, "recordedAt": recorded_at,
                "usage": figures[period_id].as_api(used), "entryId": entry_ids[(account_id, r.operation_id)]}
        results.append(BatchItemResult(i, body, replayed=False))
    return results


def _api_time(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


class _PeriodFigures:
    """Usage.as_api for one period at any `used`, with what does not depend on
    `used` worked out once: a 1,000-item batch builds 1,000 of these bodies.
    tests/metering/test_batch.py holds it to Usage.as_api, figure for figure."""

    __slots__ = ("cap", "end", "limit", "no_charge", "rate", "reserved", "start", "tier")

    def __init__(self, tier: str | None, row: tuple, shared: dict[Any, str]) -> None:
        _, _, _, self.reserved, self.limit, self.cap, rate, starts_at, ends_at = row
        self.tier = tier
        self.rate = Decimal(rate)
        if (start := shared.get(starts_at)) is None:
            start = shared[starts_at] = _api_time(starts_at)
        if (end := shared.get(ends_at)) is None:
            end = shared[ends_at] = _api_time(ends_at)
        if (no_charge := shared.get(self.rate)) is None:
            no_charge = shared[self.rate] = format_usd(Decimal(0) * self.rate)
        self.start, self.end, self.no_charge = start, end, no_charge

    def as_api(self, used: int) -> dict[str, Any]:
        limit, cap, reserved = self.limit, self.cap, self.reserved
        if limit <= 0:
            percentage = 100.0 if cap <= 0 or used > 0 else 0.0
        else:
            percentage = (max(0, used) * 10_000 // limit) / 100
        over = used - limit if used > limit else 0
        return {
            "tier": self.tier,
            "limit": limit,
            "used": used,
            "reserved": reserved,
            "remaining": limit - used if limit > used else 0,
            "available": cap - used - reserved if cap > used + reserved else 0,
            "usagePercentage": percentage,
            "status": usage_status(percentage),
            "cap": cap,
            "overage": {"tokens": over, "charge": format_usd(Decimal(over) * self.rate) if over else self.no_charge},
            "periodStart": self.start,
            "periodEnd": self.end,
        }
