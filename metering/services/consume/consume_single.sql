-- A plain consume in one statement (postgres.consume_fast): the conditional UPDATE that holds the
-- cap, and the ledger and audit rows, committed together or not at all. No row back: the ORM path
-- answers (unknown names, no open period, a replay, the cap, an alert threshold crossed).
-- The ledger row stores the usage right after it raw ("usageAfter"); contract.stored_body formats it.
WITH upd AS (
    UPDATE metering_usageperiod p SET used = p.used + %(tokens)s, updated_at = %(now)s
    -- the current period, by the rule of services/accounts.py (_containing)
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
         estimated_tokens, actual_tokens, script_class, service_key_id, actor, reason, fingerprint, response,
         created_at)
    SELECT upd.account_id, upd.id, 'consumption', %(tokens)s, 0, %(operation_id)s, %(operation_type)s,
           %(provider)s, %(model)s, %(estimated_tokens)s, %(tokens)s, %(script_class)s, %(service_key_id)s, '', '',
           %(fingerprint)s,
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
