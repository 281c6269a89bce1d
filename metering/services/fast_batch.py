"""A batch of fresh consumes on PostgreSQL in a fixed number of set-based
statements whatever its size (its items travel as one JSON parameter). Same rules
as the ORM path in batch.py, which answers whenever this returns None."""
from __future__ import annotations

import json
from datetime import datetime
from decimal import Decimal
from typing import Any

import psycopg
from django.conf import settings
from django.db import connection, transaction
from django.utils import timezone

from .batch import MAX_BATCH, BatchItemResult
from .context import RequestContext
from .usage import (ConsumeRequest, _notify_usages, format_usd, period_after_update, usage_percentage,
                    usage_status)

# One read: each user's account, tier and current period, and whether every
# operation type and provider named is known and active (evaluated once, not per row).
_BATCH_LOOKUP = """
SELECT u.user_id, a.id, t.slug, per.id,
       (SELECT count(*) FROM metering_operationtype WHERE active AND slug = ANY(%(op_types)b::text[])),
       (SELECT count(*) FROM metering_provider WHERE active AND slug = ANY(%(providers)b::text[]))
FROM unnest(%(user_ids)s::bigint[]) AS u(user_id)
JOIN metering_account a ON a.user_id = u.user_id
LEFT JOIN metering_tier t ON t.id = a.tier_id
LEFT JOIN LATERAL (
    SELECT p.id FROM metering_usageperiod p
    WHERE p.account_id = a.id AND p.starts_at <= %(now)s AND p.ends_at > %(now)s
    ORDER BY p.starts_at DESC LIMIT 1
) per ON true
"""

# The items travel as one JSON parameter (json.dumps is C; psycopg dumps a Python list
# element by element in Python, which for a dozen 1,000-element arrays cost more than
# all the SQL around them), unpacked by json_to_recordset. Short keys keep it small.
_ITEMS = """json_to_recordset(%(items)s::json) AS x(i int, u bigint, a bigint, p bigint, t bigint, o text, ot text,
                                                   pv text, m text, e int, f text, tr text)"""

# Locks, update and ledger rows in one statement, so the periods stay locked for one
# round trip and the commit, not for a conversation: under load every round trip made
# while holding them waits for a core, and every other batch for those users waits too.
# `locked` takes the row locks in id order (so concurrent batches cannot deadlock) before
# the UPDATE touches a row; the UPDATE skips any period the batch would take past its cap,
# which leaves that period out of the result and the caller rolls everything back.
# No check beforehand that the operation ids are new: ledger_one_consumption_per_operation
# refuses a recorded one here (IntegrityError, everything rolls back) and the ORM path
# answers the replay or conflict. A probe before would cost every fresh batch as much as
# the index's own check does.
# Each ledger row stores the usage right after it raw, as fast_consume.py does (a replay
# formats it with usage.stored_body): the period as the UPDATE left it, less this batch's
# later items for that period (running sums in item order).
_BATCH_WRITE = f"""
WITH x AS MATERIALIZED (
    SELECT * FROM {_ITEMS}
), d AS (
    SELECT x.p AS id, sum(x.t)::bigint AS delta FROM x GROUP BY x.p  -- sum(bigint) is numeric
), locked AS MATERIALIZED (
    SELECT per.id FROM metering_usageperiod per WHERE per.id IN (SELECT d.id FROM d) ORDER BY per.id FOR UPDATE
), upd AS (
    UPDATE metering_usageperiod per SET used = per.used + d.delta, updated_at = %(now)s
    FROM d JOIN locked ON locked.id = d.id
    WHERE per.id = d.id AND per.used + per.reserved + d.delta <= per.cap
    RETURNING per.id, per.account_id, per.used, per.reserved, per.token_limit, per.cap, per.overage_rate,
              per.starts_at, per.ends_at, d.delta
), entry AS (
    INSERT INTO metering_ledgerentry
        (account_id, period_id, kind, used_delta, reserved_delta, operation_id, operation_type, provider, model,
         estimated_tokens, actual_tokens, service_key_id, actor, reason, fingerprint, response, created_at)
    SELECT r.a, r.p, 'consumption', r.t, 0, r.o, r.ot, r.pv, r.m, r.e, r.t, %(service_key_id)s, '', '', r.f,
           jsonb_build_object('recordedAt', %(now)s::timestamptz, 'usageAfter', jsonb_build_object(
               'tier', NULLIF(r.tr, ''), 'limit', upd.token_limit, 'used', upd.used - upd.delta + r.running,
               'reserved', upd.reserved, 'cap', upd.cap, 'overageRate', upd.overage_rate::text,
               'periodStart', upd.starts_at, 'periodEnd', upd.ends_at)),
           %(now)s
    FROM (SELECT x.*, (sum(x.t) OVER (PARTITION BY x.p ORDER BY x.i))::bigint AS running FROM x) r
    JOIN upd ON upd.id = r.p
    RETURNING id, period_id, operation_id
)
SELECT entry.id, entry.operation_id, upd.id, upd.account_id, upd.used, upd.reserved, upd.token_limit, upd.cap,
       upd.overage_rate, upd.starts_at, upd.ends_at, upd.delta
FROM entry JOIN upd ON upd.id = entry.period_id
"""

# Batches write one at a time (BATCH_WRITES_TAKE_TURNS, on by default): each waits for
# this transaction-scoped advisory lock before its write statement. Batches that share
# users would queue on the periods' row locks anyway, but queued there a batch locks each
# of its 1,000 rows only after another batch changed them, and PostgreSQL re-checks every
# such row (EvalPlanQual): markedly more database CPU per batch under concurrent
# connections (bench/README.md). Queued here, the write statement starts after the batch before it
# committed and finds its rows current. The cost: batches for disjoint users take turns
# too, so one database writes at most one batch per write statement (its duration bounds
# the batch throughput of a database; bench/README.md has the figures). Single consumes never take it. The
# key is the two-int4 form, (0x6374 for "ct", 1): pick another for any other use.
_TAKE_TURN = "SELECT pg_advisory_xact_lock(25460, 1)"

# Audit rows need nothing from the locked periods, so they go in before the locks are taken.
_BATCH_AUDIT = f"""
INSERT INTO metering_auditlog
    (user_id, action, tokens, operation_type, operation_id, result, client_ip, user_agent, service_key_id,
     actor, request_id, detail, created_at)
SELECT x.u, 'consume', x.t, x.ot, x.o, 'recorded', %(client_ip)s,
       %(user_agent)s, %(service_key_id)s, %(actor)s, %(request_id)s, '{{"batch": true}}', %(now)s
FROM {_ITEMS}
"""


class _NotFast(Exception):
    """Raised inside the transaction to roll it back and leave the batch to the ORM path."""


def consume_batch_fast(*, requests: list[ConsumeRequest], ctx: RequestContext) -> list[BatchItemResult] | None:
    """A batch of fresh operations for users with open periods, none past its cap,
    in a fixed number of statements whatever its size (one read; then in one
    transaction: the audit rows, then one statement that locks the periods, updates
    them and writes the ledger rows).

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
        cursor.execute(_BATCH_LOOKUP, {"user_ids": _int_array(user_ids), "now": now, "op_types": op_types,
                                       "providers": providers}, prepare=True)
        rows = cursor.fetchall()
        if (len(rows) != len(user_ids) or rows[0][4] != len(op_types) or rows[0][5] != len(providers)
                or any(row[3] is None for row in rows)):
            return None
        found = {user_id: (account_id, tier_slug, period_id) for user_id, account_id, tier_slug, period_id, _, _ in rows}
        period_ids = [found[r.user_id][2] for r in requests]
        items = json.dumps([
            {"i": i, "u": r.user_id, "a": account_id, "p": period_id, "t": r.tokens, "o": r.operation_id,
             "ot": r.operation_type, "pv": r.provider, "m": r.model, "e": r.estimated_tokens, "f": r.fingerprint(),
             "tr": tier_slug or ""}
            for i, (r, (account_id, tier_slug, period_id)) in enumerate(zip(requests, (found[r.user_id] for r in requests)))
        ], separators=(",", ":"))
        common = {"items": items, "service_key_id": ctx.service_key_id, "now": now, "client_ip": ctx.client_ip,
                  "user_agent": (ctx.user_agent or "")[:300], "actor": ctx.actor, "request_id": ctx.request_id}
        periods = len(set(period_ids))
        try:
            with transaction.atomic():
                cursor.execute(_BATCH_AUDIT, common, prepare=True)
                # Both statements leave in one round trip: once the turn comes, the write
                # runs at once (pipeline mode), on a snapshot taken after the batch before
                # it committed.
                with connection.connection.pipeline():
                    if settings.BATCH_WRITES_TAKE_TURNS:
                        cursor.execute(_TAKE_TURN, prepare=True)
                    # binary results: psycopg's C loaders for the timestamps and rates
                    cursor.execute(_BATCH_WRITE, common, prepare=True, binary=True)
                # one row per ledger row: (entry id, operation id, then its period as the
                # UPDATE left it - id, account, used, reserved, limit, cap, rate, start, end -
                # and the batch's tokens for that period)
                rows = cursor.fetchall()
                changed = {row[2]: row for row in rows}
                if len(changed) != periods:
                    raise _NotFast  # a cap: the ORM path names the item
                # the alerts record what this batch crossed in its transaction; nothing else
                # runs between the write and the commit, while the periods are locked
                alias = connection.alias
                _notify_usages([(period_after_update(row[2:11], now, alias), row[4] - row[11])
                                for row in changed.values()])
        except _NotFast:
            return None
    after = {pk: row[2:11] for pk, row in changed.items()}
    delta = {pk: row[11] for pk, row in changed.items()}
    entry_ids = {(row[3], row[1]): row[0] for row in rows}
    return _answers(requests, now, found, period_ids, after, delta, entry_ids)


def _int_array(values) -> str:
    """A bigint[] as PostgreSQL's text literal: far cheaper to build than psycopg's
    element-by-element encoding of a Python list."""
    return "{" + ",".join(map(str, values)) + "}"


def _answers(requests: list[ConsumeRequest], now: datetime, found, period_ids: list[int], after,
             delta: dict[int, int], entry_ids: dict[tuple[int, str], int]) -> list[BatchItemResult]:
    """consume_response for each item, as a replay (usage.stored_body) will answer it:
    each item's usage right after it, as the ledger statement stored it."""
    recorded_at = _api_time(now)
    tiers = {period_id: tier_slug for _, tier_slug, period_id in found.values()}
    shared: dict[Any, str] = {}  # periods mostly share their bounds and rate: format each once
    figures = {pk: _PeriodFigures(tiers[pk], row, shared) for pk, row in after.items()}
    running = {pk: row[2] - delta[pk] for pk, row in after.items()}
    results = []
    for i, (r, period_id) in enumerate(zip(requests, period_ids)):
        used = running[period_id] = running[period_id] + r.tokens
        account_id = after[period_id][1]
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
        percentage = usage_percentage(used=used, limit=limit, cap=cap)
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
