-- A batch's locks, update and ledger rows in one statement (postgres.consume_batch_fast), so the
-- periods stay locked for one round trip and the commit, not for a conversation: under load every
-- round trip made while holding them waits for a core, and every other batch for those users waits too.
-- `locked` takes the row locks in id order (so concurrent batches cannot deadlock) before the UPDATE
-- touches a row; the UPDATE skips any period the batch would take past its cap, which leaves that
-- period out of the result and the caller rolls everything back.
-- No check beforehand that the operation ids are new: ledger_one_consumption_per_operation refuses a
-- recorded one here (IntegrityError, everything rolls back) and the ORM path answers the replay or
-- conflict. A probe before would cost every fresh batch as much as the index's own check does.
-- Each ledger row stores the usage right after it raw, as consume_single.sql does (a replay formats it
-- with contract.stored_body): the period as the UPDATE left it, less this batch's later items for that
-- period (running sums in item order).
-- Returns one row per ledger row: entry id, operation id, then its period as the UPDATE left it (id,
-- account, used, reserved, limit, cap, rate, start, end) and the batch's tokens for that period.
WITH x AS MATERIALIZED (
    SELECT * FROM {items}
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
         estimated_tokens, actual_tokens, script_class, service_key_id, actor, reason, fingerprint, response,
         created_at)
    SELECT r.a, r.p, 'consumption', r.t, 0, r.o, r.ot, r.pv, r.m, r.e, r.t, r.sc, %(service_key_id)s, '', '', r.f,
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
