"""Dashboard and analytics render time with 1,000 and with 1,000,000 ledger rows.

    python bench/dashboard_bench.py [--rebuild] [--iterations 40]

Uses its own PostgreSQL database, bench_dashboard (created with psql if missing),
and Redis db 5. Two users on the enterprise tier: `small` with 1,000 ledger rows and
`large` with 1,000,000, spread over their past (the same 250 days for both),
counters equal to the ledger, rolled up by the real rollup job; then 200 more
consumptions each through the real service, past the rollup watermark, so every
page also reads the live slice. Each page is rendered in-process (Django's test
client: routing, middleware, session auth, views, templates, queries), warmed up,
then timed; the figure is the median. The ratio large/small should stay under 1.3.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
DB = os.environ.get("BENCH_DASHBOARD_DB", "bench_dashboard")
os.environ["DATABASE_URL"] = f"postgres://postgres@127.0.0.1:5432/{DB}"
os.environ.setdefault("REDIS_URL", "redis://127.0.0.1:6379/5")
os.environ.setdefault("CELERY_TASK_ALWAYS_EAGER", "true")
os.environ["RATELIMIT_ENABLE"] = "false"  # we measure rendering, not the limiter
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "consensus_tokens.settings.base")
os.environ.setdefault("LOG_LEVEL", "WARNING")

SIZES = {"small": 1_000, "large": 1_000_000}
# The same stretch of history for both, and every day holds each of the four
# (operation type, provider, model) combinations: only the number of ledger rows
# differs (4 a day against 4,000 a day), which is what the rollups must hide.
DAYS = {"small": 250, "large": 250}


def ensure_database() -> None:
    exists = subprocess.run(["psql", "-h", "127.0.0.1", "-U", "postgres", "-tAc",
                             f"SELECT 1 FROM pg_database WHERE datname = '{DB}'"],
                            capture_output=True, text=True, check=True).stdout.strip()
    if exists != "1":
        subprocess.run(["psql", "-h", "127.0.0.1", "-U", "postgres", "-c", f'CREATE DATABASE "{DB}"'], check=True)


def seed(username: str, rows: int, days: int) -> None:
    """`rows` consumptions spread evenly over the `days` days before today, in
    calendar-month periods, with the periods' counters equal to the ledger."""
    from datetime import timedelta

    from django.contrib.auth import get_user_model
    from django.db import connection, transaction
    from django.utils import timezone

    from metering.models import Account, LedgerEntry, Tier, UsagePeriod
    from metering.periods import calendar_month
    from metering.services import account_terms

    User = get_user_model()
    user, created = User.objects.get_or_create(username=username, defaults={"email": f"{username}@bench.local"})
    if created:
        user.set_password("bench-password-1")
        user.save()
    account, _ = Account.objects.get_or_create(user=user, defaults={"tier": Tier.objects.get(slug="enterprise")})
    if LedgerEntry.objects.filter(account=account).count() >= rows:
        return
    print(f"seeding {username}: {rows:,} ledger rows over {days} days", flush=True)
    limit, cap, rate = account_terms(account)
    today = timezone.now().replace(hour=0, minute=0, second=0, microsecond=0)
    start = today - timedelta(days=days)
    month = calendar_month(start)[0]
    while month <= today:
        _, end = calendar_month(month)
        UsagePeriod.objects.get_or_create(account=account, starts_at=month, defaults={
            "ends_at": end, "token_limit": limit, "cap": cap, "overage_rate": rate})
        month = end
    seconds = days * 86400
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute("""
            INSERT INTO metering_ledgerentry (account_id, period_id, kind, used_delta, reserved_delta, operation_id,
                operation_type, provider, model, actual_tokens, actor, reason, fingerprint, created_at)
            SELECT %(account)s, p.id, 'consumption', 1 + (g %% 3), 0, 'bench-' || g,
                   (ARRAY['consensus','analysis','summary','comparison'])[1 + g %% 4],
                   (ARRAY['openai','anthropic'])[1 + g %% 2], (ARRAY['gpt-4o','claude-sonnet-4'])[1 + g %% 2],
                   1 + (g %% 3), '', '', '', t.at
            FROM generate_series(0, %(rows)s - 1) AS g
            CROSS JOIN LATERAL (SELECT %(start)s::timestamptz
                                       + make_interval(secs => (g::float8 * %(seconds)s / %(rows)s)) AS at) t
            JOIN metering_usageperiod p ON p.account_id = %(account)s AND p.starts_at <= t.at AND p.ends_at > t.at
        """, {"account": account.pk, "rows": rows, "start": start, "seconds": seconds})
        cursor.execute("""
            UPDATE metering_usageperiod p SET used = COALESCE(s.total, 0)
            FROM (SELECT period_id, SUM(used_delta) AS total FROM metering_ledgerentry
                  WHERE account_id = %s GROUP BY period_id) s
            WHERE p.id = s.period_id
        """, [account.pk])
    connection.cursor().execute("ANALYZE metering_ledgerentry")


def live_slice(username: str, count: int = 200) -> None:
    from django.contrib.auth import get_user_model

    from metering.services import SYSTEM, ConsumeRequest, usage_consume

    user = get_user_model().objects.get(username=username)
    stamp = int(time.time() * 1000)
    for i in range(count):
        usage_consume(request=ConsumeRequest(user_id=user.pk, operation_id=f"live-{stamp}-{i}", tokens=3,
                                             operation_type=("analysis", "summary")[i % 2], provider="openai",
                                             model="gpt-4o"), ctx=SYSTEM)


def pages() -> list[tuple[str, str]]:
    from django.utils import timezone

    today = timezone.now().date()
    return [
        ("dashboard", "/dashboard/"),
        ("dashboard, filtered", "/dashboard/?op=analysis"),
        ("analytics daily (30 days)", "/api/tokens/analytics/daily"),
        ("analytics daily (1 year, by op)", f"/api/tokens/analytics/daily?from={today.replace(year=today.year - 1)}"
                                            f"&to={today}&groupBy=operationType"),
        ("monthly report", f"/api/tokens/reports/monthly?month={today:%Y-%m}"),
        ("usage", "/api/tokens/usage"),
    ]


def measure(iterations: int) -> dict[str, dict[str, float]]:
    """Median milliseconds per page and user. The two users' requests alternate, so
    a busy moment on the (shared) machine falls on both alike."""
    from django.contrib.auth import get_user_model
    from django.test import Client

    clients = {}
    for username in SIZES:
        clients[username] = Client()
        clients[username].force_login(get_user_model().objects.get(username=username))
    out: dict[str, dict[str, float]] = {username: {} for username in SIZES}
    for name, url in pages():
        timings: dict[str, list[float]] = {username: [] for username in SIZES}
        for i in range(iterations + 5):
            order = list(SIZES) if i % 2 else list(reversed(SIZES))
            for username in order:
                began = time.perf_counter()
                response = clients[username].get(url)
                elapsed = (time.perf_counter() - began) * 1000
                assert response.status_code == 200, (url, response.status_code)
                if i >= 5:  # the first five warm caches and connections
                    timings[username].append(elapsed)
        for username in SIZES:
            out[username][name] = statistics.median(timings[username])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rebuild", action="store_true", help="drop and recreate the bench database first")
    parser.add_argument("--iterations", type=int, default=60)
    args = parser.parse_args()
    if args.rebuild:
        subprocess.run(["psql", "-h", "127.0.0.1", "-U", "postgres", "-c", f'DROP DATABASE IF EXISTS "{DB}"'],
                       check=True)
    ensure_database()
    import django

    django.setup()
    from django.core.management import call_command
    from django.db.models import Count

    from metering.models import LedgerEntry
    from metering.services import ledger_rollup_refresh, ledger_rollup_verify

    call_command("migrate", verbosity=0)
    for username, rows in SIZES.items():
        seed(username, rows, DAYS[username])
    began = time.perf_counter()
    run = ledger_rollup_refresh()
    print(f"rollup refresh: {run.rows_read:,} rows in {time.perf_counter() - began:.1f} s", flush=True)
    for username in SIZES:
        live_slice(username)
    counts = dict(LedgerEntry.objects.values_list("account__user__username").annotate(n=Count("id")))
    began = time.perf_counter()
    drifts = ledger_rollup_verify()
    print(f"rollup verify: {len(drifts)} drifting groups, {time.perf_counter() - began:.1f} s", flush=True)
    results = measure(args.iterations)
    print()
    print(f"| page | {counts['small']:,} rows (ms) | {counts['large']:,} rows (ms) | ratio |")
    print("|---|---:|---:|---:|")
    worst = 0.0
    for name, _ in pages():
        small, large = results["small"][name], results["large"][name]
        worst = max(worst, large / small)
        print(f"| {name} | {small:.2f} | {large:.2f} | {large / small:.2f} |")
    print(f"\nworst ratio {worst:.2f} (goal < 1.3)")


if __name__ == "__main__":
    main()
