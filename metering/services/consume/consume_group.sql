-- Single consumes that arrived together, in one statement (postgres.consume_group_fast, for the
-- combiner in combiner.py): each item decided on its own, never all or nothing. Per period the items
-- are taken in arrival order (x.i) and a prefix is recorded: the items whose running sum still fits
-- under the cap and crosses no alert threshold (nor the entry into overage). The rest, and any item
-- consume_single.sql would refuse (unknown names, no open period, an operation id recorded already),
-- is left out: no row back for it, and the ORM path answers it, as it answers whatever the single
-- statement leaves. The combiner never puts two items of one (user, operation id) in a group.
-- `locked` takes the periods' row locks in id order (as batch_write.sql does, so no deadlock with
-- batches or other groups) and reads them as they are once locked; the prefix is decided on those
-- figures, and the UPDATE, ledger and audit rows follow from it in the same statement.
-- Returns one row per recorded item: its index, ledger entry id, the usage right after it, and its
-- period as the UPDATE left it (id, account, used, reserved, limit, cap, rate, start, end, tier) with
-- the group's tokens for that period.
WITH x AS MATERIALIZED (
    SELECT * FROM json_to_recordset(%(items)s::json) AS x(i int, u bigint, t bigint, o text, ot text, pv text,
                                                          m text, e int, sc text, f text, k bigint, ip inet,
                                                          ua text, ac text, rq text)
), known AS MATERIALIZED (
    SELECT x.*, a.id AS a, per.id AS p, t.slug AS tr
    FROM x
    JOIN metering_account a ON a.user_id = x.u
    LEFT JOIN metering_tier t ON t.id = a.tier_id
    JOIN LATERAL (  -- the current period, by the rule of services/accounts.py (_containing)
        SELECT cur.id FROM metering_usageperiod cur
        WHERE cur.account_id = a.id AND cur.starts_at <= %(now)s AND cur.ends_at > %(now)s
        ORDER BY cur.starts_at DESC LIMIT 1
    ) per ON true
    WHERE EXISTS (SELECT 1 FROM metering_operationtype o WHERE o.slug = x.ot AND o.active)
      AND (x.pv = '' OR EXISTS (SELECT 1 FROM metering_provider v WHERE v.slug = x.pv AND v.active))
      AND NOT EXISTS (SELECT 1 FROM metering_ledgerentry l
                      WHERE l.account_id = a.id AND l.operation_id = x.o AND l.kind = 'consumption')
), locked AS MATERIALIZED (
    SELECT per.id, per.used, per.reserved, per.token_limit, per.cap FROM metering_usageperiod per
    WHERE per.id IN (SELECT known.p FROM known) ORDER BY per.id FOR UPDATE
), running AS (
    SELECT known.*, l.used, l.reserved, l.token_limit, l.cap,
           (sum(known.t) OVER (PARTITION BY known.p ORDER BY known.i))::bigint AS run
    FROM known JOIN locked l ON l.id = known.p
), ok AS MATERIALIZED (
    -- run grows with i (every item has tokens > 0), so both tests keep a prefix of each period's items
    SELECT * FROM running r
    WHERE r.used + r.reserved + r.run <= r.cap
      -- no alert threshold nor the entry into overage crossed by the group up to this item (the ORM
      -- path records those alerts in its transaction); in bigint, as consume_single.sql
      AND NOT (r.token_limit > 0 AND (
            (r.used <= r.token_limit AND r.used + r.run > r.token_limit)
            OR EXISTS (SELECT 1 FROM unnest(%(thresholds)s::bigint[]) AS th(pct)
                       WHERE r.used * 100 < th.pct * r.token_limit
                         AND th.pct * r.token_limit <= (r.used + r.run) * 100)))
), d AS (
    SELECT ok.p AS id, sum(ok.t)::bigint AS delta FROM ok GROUP BY ok.p
), upd AS (
    UPDATE metering_usageperiod per SET used = per.used + d.delta, updated_at = %(now)s
    FROM d
    WHERE per.id = d.id AND per.used + per.reserved + d.delta <= per.cap
    RETURNING per.id, per.account_id, per.used, per.reserved, per.token_limit, per.cap, per.overage_rate,
              per.starts_at, per.ends_at, d.delta
), entry AS (
    INSERT INTO metering_ledgerentry
        (account_id, period_id, kind, used_delta, reserved_delta, operation_id, operation_type, provider, model,
         estimated_tokens, actual_tokens, script_class, service_key_id, actor, reason, fingerprint, response,
         created_at)
    SELECT ok.a, ok.p, 'consumption', ok.t, 0, ok.o, ok.ot, ok.pv, ok.m, ok.e, ok.t, ok.sc, ok.k, '', '', ok.f,
           jsonb_build_object('recordedAt', %(now)s::timestamptz, 'usageAfter', jsonb_build_object(
               'tier', ok.tr, 'limit', upd.token_limit, 'used', upd.used - upd.delta + ok.run,
               'reserved', upd.reserved, 'cap', upd.cap, 'overageRate', upd.overage_rate::text,
               'periodStart', upd.starts_at, 'periodEnd', upd.ends_at)),
           %(now)s
    FROM ok JOIN upd ON upd.id = ok.p
    RETURNING id, account_id, operation_id
), audit AS (
    INSERT INTO metering_auditlog
        (user_id, action, tokens, operation_type, operation_id, result, client_ip, user_agent, service_key_id,
         actor, request_id, detail, created_at)
    SELECT ok.u, 'consume', ok.t, ok.ot, ok.o, 'recorded', ok.ip, ok.ua, ok.k, ok.ac, ok.rq, '{}', %(now)s
    FROM ok JOIN upd ON upd.id = ok.p
)
SELECT ok.i, entry.id, upd.used - upd.delta + ok.run, upd.id, upd.account_id, upd.used, upd.reserved,
       upd.token_limit, upd.cap, upd.overage_rate, upd.starts_at, upd.ends_at, ok.tr, upd.delta
FROM ok
JOIN upd ON upd.id = ok.p
JOIN entry ON entry.account_id = ok.a AND entry.operation_id = ok.o
