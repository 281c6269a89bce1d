"""Seed the bench database: a bench tier, load users with accounts and open
periods, a consume-scope service key, and two users with 1,000 and 1,000,000
ledger rows of history (written with generate_series, in seconds).

Idempotent: what exists is kept. Run with DJANGO_SETTINGS_MODULE=bench.settings:

    python -m bench.seed --users 1000
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from decimal import Decimal

import django

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "bench.settings")
django.setup()

from django.conf import settings  # noqa: E402
from django.contrib.auth import get_user_model  # noqa: E402
from django.contrib.auth.hashers import make_password  # noqa: E402
from django.db import connection, transaction  # noqa: E402
from django.utils import timezone  # noqa: E402

from metering.models import Account, LedgerEntry, ServiceKey, Tier  # noqa: E402
from metering.services import period_current  # noqa: E402
from metering.services.keys import hash_key  # noqa: E402

# Fixed, so the load scripts can use it; it only exists in the bench database.
BENCH_KEY = "ct_bench_0123456789abcdef0123456789abcdef"
LOAD_PREFIX = "bench-u"
HISTORY_USERS = {"bench-hist-1k": 1_000, "bench-hist-1m": 1_000_000}
# Months the history is spread over (the current one included).
HISTORY_MONTHS = 12


def bench_tier() -> Tier:
    # Large enough that repeated runs never reach the cap: the bench measures the
    # recording path, the cap check still runs on every consume.
    tier, _ = Tier.objects.update_or_create(slug="bench", defaults=dict(
        name="Bench", monthly_token_limit=2_000_000_000, overage_rate=Decimal("0.001"), allow_overage=False,
        max_overage_percentage=0, hard_limit=False, requests_per_hour=1_000_000))
    return tier


def service_key() -> ServiceKey:
    # Its hourly request limit is raised so the rate limiter counts every request
    # (the cost is measured) without refusing the bench's millions.
    key, _ = ServiceKey.objects.update_or_create(
        hashed_key=hash_key(BENCH_KEY),
        defaults={"name": "bench", "prefix": BENCH_KEY[:12], "scope": ServiceKey.Scope.CONSUME,
                  "environment": settings.DEPLOY_ENVIRONMENT, "requests_per_hour": 2_000_000_000, "revoked_at": None})
    return key


def users(count: int, tier: Tier) -> tuple[int, int]:
    """Load users bench-u00001.. with accounts and a current period; returns (first id, last id)."""
    User = get_user_model()
    names = [f"{LOAD_PREFIX}{i:05d}" for i in range(1, count + 1)]
    existing = set(User.objects.filter(username__in=names).values_list("username", flat=True))
    password = make_password(None)
    User.objects.bulk_create([User(username=n, password=password) for n in names if n not in existing])
    ids = dict(User.objects.filter(username__in=names).values_list("username", "pk"))
    with_account = set(Account.objects.filter(user_id__in=ids.values()).values_list("user_id", flat=True))
    Account.objects.bulk_create([Account(user_id=pk, tier=tier) for pk in ids.values() if pk not in with_account])
    for account in Account.objects.select_related("tier").filter(user_id__in=ids.values()):
        period_current(account=account)
    first, last = ids[names[0]], ids[names[-1]]
    if last - first + 1 != count:
        sys.exit(f"load users' ids are not contiguous ({first}..{last}); drop bench_consensus and seed again")
    return first, last


def history_user(username: str, rows: int, tier: Tier) -> int:
    User = get_user_model()
    user, _ = User.objects.get_or_create(username=username, defaults={"password": make_password(None)})
    account, _ = Account.objects.get_or_create(user=user, defaults={"tier": tier})
    current = period_current(account=account)
    have = LedgerEntry.objects.filter(account=account).count()
    if have >= rows:
        return user.pk
    started = time.perf_counter()
    with transaction.atomic(), connection.cursor() as cursor:
        # Past monthly periods before the current one, closed.
        cursor.execute("""
            INSERT INTO metering_usageperiod (account_id, starts_at, ends_at, token_limit, cap, overage_rate, used,
                                              reserved, closed_at, updated_at)
            SELECT %(account)s, %(start)s - make_interval(months => m), %(start)s - make_interval(months => m - 1),
                   %(limit)s, %(cap)s, %(rate)s, 0, 0, %(start)s - make_interval(months => m - 1), now()
            FROM generate_series(1, %(months)s - 1) AS m
            ON CONFLICT DO NOTHING
        """, {"account": account.pk, "start": current.starts_at, "limit": current.token_limit, "cap": current.cap,
              "rate": current.overage_rate, "months": HISTORY_MONTHS})
        # Consumption rows spread over those periods, tokens 1..1400, unique operation ids.
        cursor.execute("""
            WITH periods AS (
                SELECT id, starts_at, least(ends_at, now()) AS until,
                       row_number() OVER (ORDER BY starts_at) - 1 AS n
                FROM metering_usageperiod WHERE account_id = %(account)s
                ORDER BY starts_at DESC LIMIT %(months)s
            ), nperiods AS (SELECT count(*) AS c FROM periods)
            INSERT INTO metering_ledgerentry
                (account_id, period_id, kind, used_delta, reserved_delta, operation_id, operation_type, provider,
                 model, estimated_tokens, actual_tokens, actor, reason, fingerprint, response, created_at)
            SELECT %(account)s, p.id, 'consumption', t.tokens, 0, 'hist-' || g, 'analysis', 'openai', 'gpt-4o',
                   t.tokens, t.tokens, '', '', md5(g::text) || md5(g::text), NULL,
                   p.starts_at + (p.until - p.starts_at) * (g::float8 / %(rows)s)
            FROM generate_series(%(have)s + 1, %(rows)s) AS g
            CROSS JOIN LATERAL (SELECT (1 + (g::bigint * 7919) %% 1400)::int AS tokens) t
            JOIN periods p ON p.n = g %% (SELECT c FROM nperiods)
        """, {"account": account.pk, "rows": rows, "have": have, "months": HISTORY_MONTHS})
        # The counters are a cache of the ledger: make them agree.
        cursor.execute("""
            UPDATE metering_usageperiod p SET used = s.total
            FROM (SELECT period_id, sum(used_delta) AS total FROM metering_ledgerentry
                  WHERE account_id = %(account)s GROUP BY period_id) s
            WHERE p.id = s.period_id
        """, {"account": account.pk})
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE metering_ledgerentry")
        cursor.execute("ANALYZE metering_usageperiod")
    print(f"seeded {rows - have} ledger rows for {username} in {time.perf_counter() - started:.1f}s")
    return user.pk


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--users", type=int, default=1000)
    args = parser.parse_args()
    tier = bench_tier()
    key = service_key()
    first, last = users(args.users, tier)
    hist = {name: history_user(name, rows, tier) for name, rows in HISTORY_USERS.items()}
    print(f"BENCH_KEY={BENCH_KEY}")
    print(f"SERVICE_KEY_ID={key.pk}")
    print(f"USERS={first}-{last}")
    for name, pk in hist.items():
        print(f"HIST_{name.rsplit('-', 1)[1].upper()}={pk}")


if __name__ == "__main__":
    main()
