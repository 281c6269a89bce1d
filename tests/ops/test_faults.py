"""Faults during load, on real servers: a gunicorn worker SIGKILLed, Redis stopped,
PostgreSQL restarted. The web app runs with the production settings (JSON logs,
persistent connections with health checks) behind a pretend TLS proxy. Clients
retry an operation with the same body until they get a final answer, as a
well-behaved service does; afterwards every operation is recorded exactly once
and the counters equal the ledger. Throwaway Redis and PostgreSQL servers are
started for the tests that stop them; the shared ones are never touched."""
from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections import Counter

import pytest
import requests

from metering.models import AuditLog, LedgerEntry
from metering.services import SYSTEM, ConsumeRequest, ledger_reconcile, usage_consume, usage_get

from .conftest import ROOT, Load, clone_test_database, post_until_final, run_gunicorn, run_redis

pytestmark = [pytest.mark.faults, pytest.mark.django_db(transaction=True), pytest.mark.within_one_period]

THREADS = 12
OPS_PER_THREAD = 25
TOKENS = 7
DEADLINE_SECONDS = 45


def production_env(**extra: str) -> dict[str, str]:
    return {"DJANGO_SETTINGS_MODULE": "consensus_tokens.settings.production", "SECRET_KEY": secrets.token_urlsafe(50),
            "ALLOWED_HOSTS": "127.0.0.1", "STRIPE_SECRET_KEY": "sk_test_fault_tests", "CELERY_TASK_ALWAYS_EAGER": "true",
            "LOG_LEVEL": "INFO", **extra}


HTTPS = {"X-Forwarded-Proto": "https"}  # what the TLS-terminating load balancer adds


def consume_load(server, service_key: str, users: list, *, prefix: str, load: Load, during=None,
                 clients: int = THREADS, ops_each: int = OPS_PER_THREAD, tokens: int = TOKENS) -> None:
    """`clients` clients, each consuming `ops_each` operations of `tokens` for one of
    `users`, while `during()` runs in the test's thread (once three rounds are answered)."""
    headers = {"Authorization": f"Api-Key {service_key}", **HTTPS}
    deadline = time.monotonic() + DEADLINE_SECONDS
    progress = Counter()

    def client(i: int) -> None:
        user = users[i % len(users)]
        with requests.Session() as session:
            for n in range(ops_each):
                op = f"{prefix}-{i}-{n}"
                try:
                    load.results[op] = post_until_final(
                        session, server.url + "/api/tokens/consume",
                        {"userId": user.pk, "operationId": op, "tokens": tokens, "operationType": "summary"},
                        headers, load, deadline)
                except BaseException as error:  # noqa: BLE001 - reported below
                    load.errors.append(error)
                    return
                progress[i] += 1

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    if during is not None:
        while sum(progress.values()) < clients * 3:  # let the load get going
            time.sleep(0.02)
        during()
    for t in threads:
        t.join(timeout=DEADLINE_SECONDS + 10)
    assert not any(t.is_alive() for t in threads), "a client hung"
    assert not load.errors, load.errors[:3]
    assert len(load.results) == clients * ops_each


def assert_each_operation_recorded_once(load: Load, users: list, *, prefix: str) -> None:
    statuses = Counter(status for status, _ in load.results.values())
    assert set(statuses) <= {200, 201}, statuses  # 200: a retry of one that had committed
    ops = list(LedgerEntry.objects.filter(kind="consumption", operation_id__startswith=prefix)
               .values_list("operation_id", flat=True))
    assert sorted(ops) == sorted(load.results), "an operation was lost or recorded twice"
    for user in users:
        mine = [op for op in load.results if int(op.split("-")[1]) % len(users) == users.index(user)]
        assert usage_get(user_id=user.pk).used == TOKENS * len(mine)
    assert ledger_reconcile() == []
    recorded = Counter(AuditLog.objects.filter(action="consume", result="recorded", operation_id__startswith=prefix)
                       .values_list("operation_id", flat=True))
    assert set(recorded.values()) == {1} and len(recorded) == len(load.results)  # no audit row without its entry


def test_a_worker_killed_mid_request_leaves_no_partial_write(make_user, service_key):
    users = [make_user("enterprise") for _ in range(3)]
    load = Load()
    with run_gunicorn(workers=2, threads=6, env=production_env()) as server:
        victims: list[int] = []

        def kill_workers() -> None:
            for _ in range(2):
                pid = server.worker_pids()[0]
                os.kill(pid, signal.SIGKILL)
                victims.append(pid)
                time.sleep(0.6)

        consume_load(server, service_key, users, prefix="kill", load=load, during=kill_workers)
        assert not set(victims) & set(server.worker_pids()), "gunicorn replaced the killed workers"
        log = server.log()
    assert load.transient, "the kills dropped requests in flight (clients retried them)"
    assert_each_operation_recorded_once(load, users, prefix="kill")
    # structured logs: one JSON line per request, each with its request id
    lines = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    requests_logged = [line for line in lines if line["logger"] == "consensus_tokens.request"]
    assert requests_logged and all(line["request_id"] and line["path"] for line in requests_logged)


def test_64_clients_racing_one_user_to_the_cap_through_group_commit_survive_a_killed_worker(make_user, service_key):
    """Threaded workers combine the consumes arriving together (group commit); a worker
    SIGKILLed mid-load takes its group in flight with it. Once the clients have retried,
    every operation answered 201 or 200 is in the ledger once, every 402 is not, and the
    counter equals the ledger, within the cap."""
    user = make_user("enterprise")  # limit 200,000, cap 600,000; 1,000 requests an hour
    usage_consume(request=ConsumeRequest(user_id=user.pk, operation_id="setup", tokens=596_500,
                                         operation_type="summary"), ctx=SYSTEM)
    clients, ops_each, tokens = 64, 12, 7  # 768 operations (and retries) for room of 500
    load = Load()
    with run_gunicorn(workers=2, threads=16, env=production_env(METRICS_TOKEN="race-scrape")) as server:
        def kill_a_worker() -> None:
            os.kill(server.worker_pids()[0], signal.SIGKILL)

        consume_load(server, service_key, [user], prefix="race", load=load, during=kill_a_worker,
                     clients=clients, ops_each=ops_each, tokens=tokens)
        metrics = requests.get(server.url + "/metrics", headers={"Authorization": "Bearer race-scrape"}).text

    assert load.transient, "the kill dropped requests in flight (clients retried them)"
    statuses = Counter(status for status, _ in load.results.values())
    assert set(statuses) <= {200, 201, 402} and statuses[201] and statuses[402], statuses
    allowed = {op for op, (status, _) in load.results.items() if status in (200, 201)}
    assert all(body["error"]["code"] == "token_cap_exceeded" for status, body in load.results.values()
               if status == 402)
    recorded = list(LedgerEntry.objects.filter(kind="consumption", operation_id__startswith="race-")
                    .values_list("operation_id", flat=True))
    assert sorted(recorded) == sorted(allowed), "an operation was lost or recorded twice"
    usage = usage_get(user_id=user.pk)
    assert usage.used == 596_500 + tokens * len(allowed) <= usage.cap
    assert usage.cap - usage.used < tokens  # the race filled the room
    assert ledger_reconcile() == []
    groups = [line for line in metrics.splitlines() if line.startswith("ct_consume_groups_total")]
    assert groups and float(groups[0].split()[-1]) > 0, "the consumes were combined"


def test_metering_carries_on_when_redis_stops(make_user, service_key):
    users = [make_user("enterprise") for _ in range(3)]
    load = Load()
    with run_redis() as (port, redis_process):
        redis_url = f"redis://127.0.0.1:{port}/0"
        with run_gunicorn(workers=2, threads=6, env=production_env(REDIS_URL=redis_url,
                                                                   METRICS_TOKEN="fault-scrape")) as server:
            headers = {"Authorization": f"Api-Key {service_key}", **HTTPS}
            estimate = {"userId": users[0].pk, "operationType": "summary", "topic": "redis goes away " * 50}
            assert requests.post(server.url + "/api/tokens/estimate", json=estimate, headers=headers).status_code == 200
            assert requests.post(server.url + "/api/tokens/estimate", json=estimate,
                                 headers=headers).json()["cached"] is True
            limited = requests.get(server.url + f"/api/tokens/usage?userId={users[0].pk}", headers=headers)
            assert limited.headers["X-RateLimit-Limit"] == "1000"

            def stop_redis() -> None:
                redis_process.kill()
                redis_process.wait(timeout=5)

            consume_load(server, service_key, users, prefix="redis", load=load, during=stop_redis)
            after = requests.post(server.url + "/api/tokens/estimate", json=estimate, headers=headers)
            usage = requests.get(server.url + f"/api/tokens/usage?userId={users[0].pk}", headers=headers)
            ready = requests.get(server.url + "/health/ready")  # plain HTTP: exempt from the HTTPS redirect
            metrics = requests.get(server.url + "/metrics", headers={"Authorization": "Bearer fault-scrape"}).text
            log = server.log()
    assert not [t for t in load.transient if t[0] >= 500], load.transient[:3]  # no 5xx at all: it failed open
    assert_each_operation_recorded_once(load, users, prefix="redis")
    assert after.status_code == 200 and after.json()["cached"] is False  # the estimate cache is bypassed
    assert usage.status_code == 200 and "X-RateLimit-Limit" not in usage.headers  # limits fail open
    assert ready.status_code == 503 and ready.json()["checks"]["redis"] == "failing"
    errors = [line for line in metrics.splitlines() if line.startswith("ct_ratelimit_backend_errors_total")]
    assert errors and float(errors[0].split()[-1]) > 0
    assert "rate limit store unreachable" in log


def test_postgres_restart_answers_503_then_resumes_with_nothing_lost_or_doubled(make_user, service_key,
                                                                                  postgres_cluster):
    users = [make_user("enterprise") for _ in range(3)]
    database_url = clone_test_database(postgres_cluster)
    load = Load()
    with run_gunicorn(workers=2, threads=6, env=production_env(DATABASE_URL=database_url)) as server:
        down_ready: list[requests.Response] = []

        def restart_postgres() -> None:
            postgres_cluster.stop()
            time.sleep(1.0)
            down_ready.append(requests.get(server.url + "/health/ready"))
            time.sleep(0.5)
            postgres_cluster.start()

        consume_load(server, service_key, users, prefix="pg", load=load, during=restart_postgres)
        ready = requests.get(server.url + "/health/ready")

    unavailable = [body for status, body in load.transient if status == 503]
    assert unavailable, "clients saw the outage"
    assert all(body["error"]["code"] == "service_unavailable" and body["error"]["message"] for body in unavailable)
    assert not [t for t in load.transient if t[0] not in (0, 503)], load.transient[:5]
    assert down_ready[0].status_code == 503 and down_ready[0].json()["checks"]["database"] == "failing"
    assert ready.status_code == 200

    statuses = Counter(status for status, _ in load.results.values())
    assert set(statuses) <= {200, 201}, statuses
    # check the throwaway cluster's ledger with the reconcile command and SQL
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "consensus_tokens.settings.test", "DATABASE_URL": database_url}
    reconcile = subprocess.run([sys.executable, "manage.py", "reconcile"], cwd=ROOT, env=env, capture_output=True,
                               text=True, timeout=60)
    assert reconcile.returncode == 0 and "OK" in reconcile.stdout, reconcile.stdout + reconcile.stderr
    rows = postgres_cluster.psql("-d", "ct_fault", "-At", "-c",
                                 "SELECT operation_id, count(*) FROM metering_ledgerentry "
                                 "WHERE kind = 'consumption' AND operation_id LIKE 'pg-%' GROUP BY operation_id").stdout
    counts = dict(line.split("|") for line in rows.split())
    assert sorted(counts) == sorted(load.results) and set(counts.values()) == {"1"}
    used = postgres_cluster.psql("-d", "ct_fault", "-At", "-c",
                                 "SELECT sum(p.used) FROM metering_usageperiod p JOIN metering_account a "
                                 f"ON a.id = p.account_id WHERE a.user_id IN ({','.join(str(u.pk) for u in users)})"
                                 ).stdout.strip()
    assert int(used) == TOKENS * len(load.results)
