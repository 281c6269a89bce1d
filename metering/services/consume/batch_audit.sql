-- A batch's audit rows: they need nothing from the locked periods, so they go in before the locks
-- are taken (postgres.consume_batch_fast).
INSERT INTO metering_auditlog
    (user_id, action, tokens, operation_type, operation_id, result, client_ip, user_agent, service_key_id,
     actor, request_id, detail, created_at)
SELECT x.u, 'consume', x.t, x.ot, x.o, 'recorded', %(client_ip)s,
       %(user_agent)s, %(service_key_id)s, %(actor)s, %(request_id)s, '{"batch": true}', %(now)s
FROM {items}
