"""A batch of fresh consumes on PostgreSQL in a fixed number of set-based
statements (array parameters, binary encoded), whatever its size. Same rules as
the ORM path in batch.py, which answers whenever this returns None."""
from __future__ import annotations

import json
from collections import defaultdict
from decimal import Decimal

import psycopg
from django.db import connection, transaction
from django.utils import timezone

from ..models import UsagePeriod
from .batch import MAX_BATCH, BatchItemResult
from .context import RequestContext
from .usage import ConsumeRequest, Usage, _notify_usage, consume_response

_BATCH_LOOKUP = """
SELECT u.user_id, a.id, t.slug, per.id
FROM unnest(%(user_ids)b::bigint[]) AS u(user_id)
JOIN metering_account a ON a.user_id = u.user_id
LEFT JOIN metering_tier t ON t.id = a.tier_id
LEFT JOIN LATERAL (
    SELECT p.id FROM metering_usageperiod p
    WHERE p.account_id = a.id AND p.starts_at <= %(now)s AND p.ends_at > %(now)s
    ORDER BY p.starts_at DESC LIMIT 1
) per ON true
"""

_BATCH_KNOWN = """
SELECT (SELECT count(*) FROM metering_operationtype WHERE active AND slug = ANY(%(op_types)b::text[])),
       (SELECT count(*) FROM metering_provider WHERE active AND slug = ANY(%(providers)b::text[])),
       EXISTS (SELECT 1 FROM unnest(%(account_ids)b::bigint[], %(operation_ids)b::text[]) AS x(account_id, operation_id)
               JOIN metering_ledgerentry l ON l.account_id = x.account_id AND l.operation_id = x.operation_id
                                          AND l.kind = 'consumption')
"""

_BATCH_LOCK = "SELECT id FROM metering_usageperiod WHERE id = ANY(%(ids)b::bigint[]) ORDER BY id FOR UPDATE"

_BATCH_UPDATE = """
UPDATE metering_usageperiod p SET used = p.used + d.delta, updated_at = %(now)s
FROM unnest(%(ids)b::bigint[], %(deltas)b::bigint[]) AS d(id, delta)
WHERE p.id = d.id AND p.used + p.reserved + d.delta <= p.cap
RETURNING p.id, p.account_id, p.used, p.reserved, p.token_limit, p.cap, p.overage_rate, p.starts_at, p.ends_at
"""

_BATCH_LEDGER = """
INSERT INTO metering_ledgerentry
    (account_id, period_id, kind, used_delta, reserved_delta, operation_id, operation_type, provider, model,
     estimated_tokens, actual_tokens, service_key_id, actor, reason, fingerprint, response, created_at)
SELECT x.account_id, x.period_id, 'consumption', x.tokens, 0, x.operation_id, x.operation_type, x.provider,
       x.model, x.estimated_tokens, x.tokens, %(service_key_id)s, '', '', x.fingerprint, x.response::jsonb, %(now)s
FROM unnest(%(account_ids)b::bigint[], %(period_ids)b::bigint[], %(tokens)b::bigint[], %(operation_ids)b::text[],
            %(operation_types)b::text[], %(providers)b::text[], %(models)b::text[], %(estimated)b::int[],
            %(fingerprints)b::text[], %(responses)b::text[])
     AS x(account_id, period_id, tokens, operation_id, operation_type, provider, model, estimated_tokens,
          fingerprint, response)
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
    in a fixed number of statements whatever its size (two reads; then in one
    transaction: audit rows, period locks, one update, ledger rows).

    Returns None, having changed nothing, for anything else - a replayed or
    conflicting operation id, an unknown user, operation type or provider, a
    duplicate, a reservation, a user without an account or period yet, a cap -
    and the ORM path in batch.py answers, refusals and replays included.
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
        cursor.execute(_BATCH_LOOKUP, {"user_ids": user_ids, "now": now}, prepare=True)
        found = {user_id: (account_id, tier_slug, period_id)
                 for user_id, account_id, tier_slug, period_id in cursor.fetchall()}
        if len(found) != len(user_ids) or any(v[2] is None for v in found.values()):
            return None
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
        op_types = sorted({r.operation_type for r in requests})
        providers = sorted({r.provider for r in requests if r.provider})
        cursor.execute(_BATCH_KNOWN, {"op_types": op_types, "providers": providers, **columns}, prepare=True)
        known_ops, known_providers, any_recorded = cursor.fetchone()
        if known_ops != len(op_types) or known_providers != len(providers) or any_recorded:
            return None

        delta: dict[int, int] = defaultdict(int)
        for r in requests:
            delta[found[r.user_id][2]] += r.tokens
        period_ids = sorted(delta)
        # Foreign keys are checked at commit (Django makes them deferred), which is
        # inside the window where the periods are locked; checked as each statement
        # ends instead, the audit rows' 2,000 checks happen before the locks. Only in
        # a transaction of our own: in an outer one this would change its checks too.
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
                                               "now": now}, prepare=True)
                after = {row[0]: row for row in cursor.fetchall()}
                if len(after) != len(period_ids):
                    raise _NotFast  # a cap: the ORM path names the item
                results = _batch_record(cursor, requests, columns, found, after, delta)
        except _NotFast:
            return None
    return results


def _batch_record(cursor, requests: list[ConsumeRequest], columns: dict, found, after,
                  delta: dict[int, int]) -> list[BatchItemResult]:
    now = columns["now"]
    running = {pk: row[2] - delta[pk] for pk, row in after.items()}
    bodies = []
    for r in requests:
        _, tier_slug, period_id = found[r.user_id]
        _, _, _, reserved, limit, cap, rate, starts_at, ends_at = after[period_id]
        running[period_id] += r.tokens
        usage = Usage(tier=tier_slug, limit=limit, used=running[period_id], reserved=reserved, cap=cap,
                      overage_rate=Decimal(rate), period_start=starts_at, period_end=ends_at)
        bodies.append(consume_response(request=r, usage=usage, recorded_at=now))
    cursor.execute(_BATCH_LEDGER, {**columns, "responses": [json.dumps(b) for b in bodies]}, prepare=True)
    entry_ids = {(account_id, operation_id): pk for pk, account_id, operation_id in cursor.fetchall()}
    for pk, (_, account_id, used, reserved, limit, cap, rate, starts_at, ends_at) in after.items():
        period = UsagePeriod(pk=pk, account_id=account_id, used=used, reserved=reserved, token_limit=limit, cap=cap,
                             overage_rate=rate, starts_at=starts_at, ends_at=ends_at)
        _notify_usage(period, used - delta[pk])
    return [BatchItemResult(i, {**body, "entryId": entry_ids[(found[r.user_id][0], r.operation_id)]}, replayed=False)
            for i, (r, body) in enumerate(zip(requests, bodies))]
