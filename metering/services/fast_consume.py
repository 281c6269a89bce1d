"""The direct consume on PostgreSQL in two statements.

Same rules as the ORM path in usage.py: one conditional UPDATE holds the cap,
the ledger row and audit row commit with it, a concurrent replay of the same
operation id hits the ledger's unique constraint and rolls everything back.
When the UPDATE does not happen (unknown user or operation type, no open
period, a replay, the cap) this returns None and the ORM path, which tells
those cases apart, answers instead.

Both statements run as server-side prepared statements on a plain psycopg
cursor over Django's connection (so inside Django's transaction): PostgreSQL
plans them once per connection instead of on every request, which was most of
the database's time for a consume (bench/README.md).
"""
from __future__ import annotations

import json
from decimal import Decimal

import psycopg
from django.db import IntegrityError, connection, transaction
from django.utils import timezone

from ..models import UsagePeriod
from .context import RequestContext
from .usage import ConsumeRequest, ConsumeResult, Usage, _notify_usage, consume_response

_UPDATE = """
WITH acct AS (
    SELECT a.id AS account_id, t.slug AS tier_slug
    FROM metering_account a LEFT JOIN metering_tier t ON t.id = a.tier_id
    WHERE a.user_id = %(user_id)s
), per AS (
    SELECT p.id FROM metering_usageperiod p JOIN acct ON p.account_id = acct.account_id
    WHERE p.starts_at <= %(now)s AND p.ends_at > %(now)s
    ORDER BY p.starts_at DESC LIMIT 1
), upd AS (
    UPDATE metering_usageperiod p SET used = p.used + %(tokens)s, updated_at = %(now)s
    FROM per
    WHERE p.id = per.id AND p.used + p.reserved + %(tokens)s <= p.cap
      AND EXISTS (SELECT 1 FROM metering_operationtype o WHERE o.slug = %(operation_type)s AND o.active)
      AND (%(provider)s = '' OR EXISTS (SELECT 1 FROM metering_provider v WHERE v.slug = %(provider)s AND v.active))
      AND NOT EXISTS (SELECT 1 FROM metering_ledgerentry l
                      WHERE l.account_id = p.account_id AND l.operation_id = %(operation_id)s
                        AND l.kind = 'consumption')
    RETURNING p.id, p.account_id, p.used, p.reserved, p.token_limit, p.cap, p.overage_rate, p.starts_at, p.ends_at
)
SELECT upd.*, (SELECT tier_slug FROM acct) FROM upd
"""

_INSERT = """
WITH entry AS (
    INSERT INTO metering_ledgerentry
        (account_id, period_id, kind, used_delta, reserved_delta, operation_id, operation_type, provider, model,
         estimated_tokens, actual_tokens, service_key_id, actor, reason, fingerprint, response, created_at)
    VALUES (%(account_id)s, %(period_id)s, 'consumption', %(tokens)s, 0, %(operation_id)s, %(operation_type)s,
            %(provider)s, %(model)s, %(estimated_tokens)s, %(tokens)s, %(service_key_id)s, '', '', %(fingerprint)s,
            %(response)s, %(now)s)
    RETURNING id
), audit AS (
    INSERT INTO metering_auditlog
        (user_id, action, tokens, operation_type, operation_id, result, client_ip, user_agent, service_key_id,
         actor, request_id, detail, created_at)
    VALUES (%(user_id)s, 'consume', %(tokens)s, %(operation_type)s, %(operation_id)s, 'recorded', %(client_ip)s,
            %(user_agent)s, %(service_key_id)s, %(actor)s, %(request_id)s, '{}', %(now)s)
)
SELECT id FROM entry
"""


def consume_fast(*, request: ConsumeRequest, ctx: RequestContext) -> ConsumeResult | None:
    now = timezone.now()
    params = {
        "user_id": request.user_id, "now": now, "tokens": request.tokens, "operation_type": request.operation_type,
        "provider": request.provider, "operation_id": request.operation_id,
    }
    connection.close_if_health_check_failed()  # as Django's own cursors do before first use
    try:
        # wrap_database_errors: psycopg's errors become Django's, and a broken
        # connection is noticed and closed at the end of the request.
        with transaction.atomic(), connection.wrap_database_errors, psycopg.Cursor(connection.connection) as cursor:
            cursor.execute(_UPDATE, params, prepare=True)
            row = cursor.fetchone()
            if row is None:
                return None
            period_id, account_id, used, reserved, limit, cap, rate, starts_at, ends_at, tier_slug = row
            usage = Usage(tier=tier_slug, limit=limit, used=used, reserved=reserved, cap=cap,
                          overage_rate=Decimal(rate), period_start=starts_at, period_end=ends_at)
            body = consume_response(request=request, usage=usage, recorded_at=now)
            cursor.execute(_INSERT, prepare=True, params={
                **params, "account_id": account_id, "period_id": period_id, "model": request.model,
                "estimated_tokens": request.estimated_tokens, "service_key_id": ctx.service_key_id,
                "fingerprint": request.fingerprint(), "response": json.dumps(body), "client_ip": ctx.client_ip,
                "user_agent": (ctx.user_agent or "")[:300], "actor": ctx.actor, "request_id": ctx.request_id,
            })
            entry_id = cursor.fetchone()[0]
            period = UsagePeriod(pk=period_id, account_id=account_id, used=used, reserved=reserved,
                                 token_limit=limit, cap=cap, overage_rate=rate, starts_at=starts_at, ends_at=ends_at)
            _notify_usage(period, used - request.tokens)
    except IntegrityError:
        return None  # the same operation id committed concurrently: the ORM path replays it
    return ConsumeResult({**body, "entryId": entry_id}, replayed=False)
