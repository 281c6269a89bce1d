"""The direct consume on PostgreSQL in one statement, one round trip.

Same rules as the ORM path in usage.py, in a single autocommit statement: one
conditional UPDATE holds the cap, and the ledger row and the audit row are
inserted by the same statement, so they commit together or not at all. A
concurrent replay of the same operation id hits the ledger's unique constraint
and the whole statement fails, changing nothing.

The statement applies only to the plain case: a known, active operation type
and provider, an open period, a fresh operation id, room under the cap, and no
alert threshold (or the entry into overage) crossed by this change. Anything
else - unknown user or operation type, no open period, a replay, the cap, a
crossing - returns None having changed nothing, and the ORM path, which tells
those cases apart and records threshold alerts in its transaction, answers.

It runs through prepared.fetch_one_prepared: a server-side prepared statement,
no BEGIN/COMMIT round trips outside a transaction and no health-check query; a
dropped connection is reopened and the statement run again, which is safe
because it is idempotent per operation id (if the first attempt did commit, the
retry finds its ledger row and the ORM path answers with the replay).
"""
from __future__ import annotations

from decimal import Decimal

from django.db import IntegrityError
from django.utils import timezone

from ..thresholds import usage_thresholds
from .context import RequestContext
from .prepared import fetch_one_prepared
from .usage import ConsumeRequest, ConsumeResult, Usage, _notify_usage, consume_response, period_after_update

_CONSUME = """
WITH upd AS (
    UPDATE metering_usageperiod p SET used = p.used + %(tokens)s, updated_at = %(now)s
    WHERE p.id = (SELECT cur.id FROM metering_usageperiod cur
                  WHERE cur.account_id = (SELECT a.id FROM metering_account a WHERE a.user_id = %(user_id)s)
                    AND cur.starts_at <= %(now)s AND cur.ends_at > %(now)s
                  ORDER BY cur.starts_at DESC LIMIT 1)
      AND p.used + p.reserved + %(tokens)s <= p.cap
      AND EXISTS (SELECT 1 FROM metering_operationtype o WHERE o.slug = %(operation_type)s AND o.active)
      AND (%(provider)s = '' OR EXISTS (SELECT 1 FROM metering_provider v WHERE v.slug = %(provider)s AND v.active))
      AND NOT EXISTS (SELECT 1 FROM metering_ledgerentry l
                      WHERE l.account_id = p.account_id AND l.operation_id = %(operation_id)s
                        AND l.kind = 'consumption')
      -- an alert threshold or the entry into overage: the ORM path records the alert in its transaction
      -- (in bigint: the limit is an int4 column, and limit x 100 can pass 2^31)
      AND NOT (p.token_limit > 0 AND (
            (p.used <= p.token_limit AND p.used + %(tokens)s > p.token_limit)
            OR EXISTS (SELECT 1 FROM unnest(%(thresholds)s::bigint[]) AS th(pct)
                       WHERE p.used * 100 < th.pct * p.token_limit
                         AND th.pct * p.token_limit <= (p.used + %(tokens)s) * 100)))
    RETURNING p.id, p.account_id, p.used, p.reserved, p.token_limit, p.cap, p.overage_rate, p.starts_at, p.ends_at,
              (SELECT t.slug FROM metering_account a JOIN metering_tier t ON t.id = a.tier_id
               WHERE a.id = p.account_id) AS tier_slug
), entry AS (
    INSERT INTO metering_ledgerentry
        (account_id, period_id, kind, used_delta, reserved_delta, operation_id, operation_type, provider, model,
         estimated_tokens, actual_tokens, service_key_id, actor, reason, fingerprint, response, created_at)
    SELECT upd.account_id, upd.id, 'consumption', %(tokens)s, 0, %(operation_id)s, %(operation_type)s,
           %(provider)s, %(model)s, %(estimated_tokens)s, %(tokens)s, %(service_key_id)s, '', '', %(fingerprint)s,
           jsonb_build_object('recordedAt', %(now)s, 'usageAfter', jsonb_build_object(
               'tier', upd.tier_slug, 'limit', upd.token_limit, 'used', upd.used, 'reserved', upd.reserved,
               'cap', upd.cap, 'overageRate', upd.overage_rate::text,
               'periodStart', upd.starts_at, 'periodEnd', upd.ends_at)),
           %(now)s
    FROM upd
    RETURNING id
), audit AS (
    INSERT INTO metering_auditlog
        (user_id, action, tokens, operation_type, operation_id, result, client_ip, user_agent, service_key_id,
         actor, request_id, detail, created_at)
    -- the account's user_id, not the parameter: a userId past the column's range must find
    -- no account (the ORM path answers unknown_user), not fail on this insert's cast
    SELECT (SELECT a.user_id FROM metering_account a WHERE a.id = upd.account_id), 'consume', %(tokens)s, %(operation_type)s, %(operation_id)s, 'recorded', %(client_ip)s,
           %(user_agent)s, %(service_key_id)s, %(actor)s, %(request_id)s, '{}', %(now)s
    FROM upd
)
SELECT upd.id, upd.account_id, upd.used, upd.reserved, upd.token_limit, upd.cap, upd.overage_rate, upd.starts_at,
       upd.ends_at, upd.tier_slug, entry.id
FROM upd, entry
"""


def consume_fast(*, request: ConsumeRequest, ctx: RequestContext) -> ConsumeResult | None:
    now = timezone.now()
    params = {
        "user_id": request.user_id, "now": now, "tokens": request.tokens, "operation_type": request.operation_type,
        "provider": request.provider, "operation_id": request.operation_id, "model": request.model,
        "estimated_tokens": request.estimated_tokens, "service_key_id": ctx.service_key_id,
        "fingerprint": request.fingerprint(), "client_ip": ctx.client_ip, "user_agent": (ctx.user_agent or "")[:300],
        "actor": ctx.actor, "request_id": ctx.request_id, "thresholds": usage_thresholds(),
    }
    try:
        row = fetch_one_prepared(_CONSUME, params)
    except IntegrityError:
        return None  # the same operation id committed concurrently: the ORM path replays it
    if row is None:
        return None
    period_id, account_id, used, reserved, limit, cap, rate, starts_at, ends_at, tier_slug, entry_id = row
    usage = Usage(tier=tier_slug, limit=limit, used=used, reserved=reserved, cap=cap,
                  overage_rate=Decimal(rate), period_start=starts_at, period_end=ends_at)
    # Committed already (or with the caller's transaction); no threshold was crossed, so
    # the receivers only count (metrics) - alerts find nothing to record.
    _notify_usage(period_after_update(row[:9], now), used - request.tokens)
    body = consume_response(request=request, usage=usage, recorded_at=now)
    return ConsumeResult({**body, "entryId": entry_id}, replayed=False)
