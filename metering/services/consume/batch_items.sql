-- A batch's items, as postgres.py sends them: one JSON parameter (json.dumps is C; psycopg dumps a
-- Python list element by element in Python, which for a dozen 1,000-element arrays cost more than all
-- the SQL around them), unpacked here. Short keys keep it small. Stands for {items} in batch_write.sql
-- and batch_audit.sql.
json_to_recordset(%(items)s::json) AS x(i int, u bigint, a bigint, p bigint, t bigint, o text, ot text,
                                                   pv text, m text, e int, sc text, f text, tr text)
