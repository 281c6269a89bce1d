-- A batch's one read (postgres.consume_batch_fast): each user's account, tier and current period,
-- and whether every operation type and provider named is known and active (evaluated once, not per row).
SELECT u.user_id, a.id, t.slug, per.id,
       (SELECT count(*) FROM metering_operationtype WHERE active AND slug = ANY(%(op_types)b::text[])),
       (SELECT count(*) FROM metering_provider WHERE active AND slug = ANY(%(providers)b::text[]))
FROM unnest(%(user_ids)s::bigint[]) AS u(user_id)
JOIN metering_account a ON a.user_id = u.user_id
LEFT JOIN metering_tier t ON t.id = a.tier_id
LEFT JOIN LATERAL (  -- the current period, by the rule of services/accounts.py (_containing)
    SELECT p.id FROM metering_usageperiod p
    WHERE p.account_id = a.id AND p.starts_at <= %(now)s AND p.ends_at > %(now)s
    ORDER BY p.starts_at DESC LIMIT 1
) per ON true
