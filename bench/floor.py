"""What this stack allows at best: DRF views under the same gunicorn, middleware and
settings as the bare reference, each doing only the least a consume (or a batch)
cannot do without, and nothing of the project's own - no service key lookup, no
validation, no rate-limit rules, no audit row, no answer worth the name.

They answer how far the real endpoints can get on this machine, whatever is done to
the code between them: a consume that records durably must make at least one
PostgreSQL round trip, and one that counts a rate limit in Redis one more.

    /bench/floor/post          parse the JSON body, answer
    /bench/floor/redis         + one EVALSHA counting a per-user hourly window (the rate limiter's script)
    /bench/floor/select1       + one trivial prepared statement on PostgreSQL, instead
    /bench/floor/consume-sql   + the consume statement itself (metering/services/consume/consume_single.sql), instead
    /bench/floor/redis+consume-sql  both round trips: the least a rate-limited consume costs
    /bench/floor/batch-ledger  a batch's body parsed and one multi-row ledger INSERT in a transaction

Only bench.settings routes them (bench/urls.py); they write to bench_consensus only.
"""
from __future__ import annotations

import time
from typing import Any

import psycopg
from django.core.cache import caches
from django.db import connection, transaction
from django.utils import timezone
from rest_framework.permissions import AllowAny
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from consensus_tokens.ratelimit import _COUNT_SCRIPT, _redis_client
from metering.services.consume.postgres import CONSUME_SINGLE
from metering.services.prepared import fetch_one_prepared

VARIANTS = ("post", "redis", "select1", "consume-sql", "redis+consume-sql")


def _count(user_id: int) -> list[int]:
    cache = caches["default"]
    client = _redis_client(cache)
    script = cache.__dict__.get("_ct_floor_script") or cache.__dict__.setdefault(
        "_ct_floor_script", client.register_script(_COUNT_SCRIPT))
    window = int(time.time()) // 3600
    return script(keys=[f"bench-floor:{user_id}:{window}", "bench-floor:version"], args=[3700], client=client)


def _consume_sql(data: dict[str, Any]) -> tuple | None:
    return fetch_one_prepared(CONSUME_SINGLE, {
        "user_id": data["userId"], "now": timezone.now(), "tokens": data["tokens"],
        "operation_type": data["operationType"], "provider": data.get("provider", ""),
        "operation_id": data["operationId"], "model": data.get("model", ""),
        "estimated_tokens": data.get("estimatedTokens"), "service_key_id": None, "fingerprint": "",
        "client_ip": "127.0.0.1", "user_agent": "", "actor": "", "request_id": "", "thresholds": [75, 90, 100]})


class FloorApi(APIView):
    authentication_classes: list = []
    permission_classes = [AllowAny]
    variant = "post"

    def post(self, request: Request) -> Response:
        data = request.data
        row = None
        if "redis" in self.variant:
            _count(data["userId"])
        if self.variant == "select1":
            row = fetch_one_prepared("SELECT %(user_id)s::bigint", {"user_id": data["userId"]})
        elif "consume-sql" in self.variant:
            row = _consume_sql(data)
        return Response({"ok": True, "row": row is not None}, status=201)


_LEDGER_ONLY = """
INSERT INTO metering_ledgerentry
    (account_id, period_id, kind, used_delta, reserved_delta, operation_id, operation_type, provider, model,
     estimated_tokens, actual_tokens, service_key_id, actor, reason, fingerprint, response, created_at)
SELECT x.a, x.p, 'consumption', x.t, 0, x.o, x.ot, x.pv, '', NULL, x.t, NULL, '', '', '', NULL, %(now)s
FROM json_to_recordset(%(items)s::json) AS x(a bigint, p bigint, t bigint, o text, ot text, pv text)
"""


class FloorBatchApi(APIView):
    """A batch's body parsed, then one multi-row ledger INSERT of its items (accounts and
    periods from a dict this process loads once), in a transaction; a one-line answer."""
    authentication_classes: list = []
    permission_classes = [AllowAny]
    periods: dict[int, tuple[int, int]] = {}

    def post(self, request: Request) -> Response:
        import json

        operations = request.data["operations"]
        periods = self._periods()
        items = json.dumps([{"a": periods[op["userId"]][0], "p": periods[op["userId"]][1], "t": op["tokens"],
                             "o": op["operationId"], "ot": op["operationType"], "pv": op.get("provider", "")}
                            for op in operations])
        connection.ensure_connection()
        with transaction.atomic(), psycopg.Cursor(connection.connection) as cursor:
            cursor.execute(_LEDGER_ONLY, {"items": items, "now": timezone.now()}, prepare=True)
        return Response({"recorded": len(operations)}, status=201)

    @classmethod
    def _periods(cls) -> dict[int, tuple[int, int]]:
        if not cls.periods:
            with connection.cursor() as cursor:
                cursor.execute("SELECT a.user_id, a.id, p.id FROM metering_account a JOIN metering_usageperiod p "
                               "ON p.account_id = a.id AND p.starts_at <= now() AND p.ends_at > now()")
                cls.periods = {user_id: (account_id, period_id) for user_id, account_id, period_id in cursor}
        return cls.periods
