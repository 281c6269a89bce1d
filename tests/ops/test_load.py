"""Load on a real gunicorn server (2 workers) on loopback, against the test database:
100 concurrent checks all succeed; 100 concurrent consumes for one user near the
cap hold the cap and lose nothing. Prometheus counters add up across workers."""
from __future__ import annotations

import threading
from collections import Counter

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from metering.models import AuditLog, LedgerEntry
from metering.services import ConsumeRequest, SYSTEM, ledger_reconcile, usage_consume, usage_get

from .conftest import run_gunicorn

pytestmark = [pytest.mark.load, pytest.mark.django_db(transaction=True), pytest.mark.within_one_period]

CLIENTS = 100


def fire_together(count: int, send) -> list[tuple[int, dict]]:
    """count threads, each with its own connection, released at once; each sends one request."""
    barrier = threading.Barrier(count)
    results: list = [None] * count

    def worker(i: int) -> None:
        with requests.Session() as session:
            barrier.wait(timeout=30)
            try:
                response = send(session, i)
                results[i] = (response.status_code, response.json())
            except Exception as error:  # noqa: BLE001 - reported by the assertion below
                results[i] = (0, {"exception": repr(error)})

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads), "a client hung"
    return results


def scraped(server) -> dict[tuple[str, tuple], float]:
    text = requests.get(server.url + "/metrics", timeout=10).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_100_concurrent_checks_all_succeed(make_user, service_key):
    user = make_user("pro")  # 500 requests an hour: the 100 fit
    usage_consume(request=ConsumeRequest(user_id=user.pk, operation_id="seed", tokens=1000,
                                         operation_type="summary"), ctx=SYSTEM)
    headers = {"Authorization": f"Api-Key {service_key}"}
    with run_gunicorn(workers=2, threads=8) as server:
        results = fire_together(CLIENTS, lambda s, i: s.post(
            server.url + "/api/tokens/check", json={"userId": user.pk, "tokens": 500 + i}, headers=headers, timeout=30))
        metrics = scraped(server)
    assert [status for status, _ in results] == [200] * CLIENTS, [r for r in results if r[0] != 200][:3]
    assert all(body["sufficient"] and body["available"] == 99_000 and body["cap"] == 100_000 for _, body in results)
    assert AuditLog.objects.filter(user=user, action="check", result="sufficient").count() == CLIENTS
    # counted by both workers, added up by the multiprocess collector
    assert metrics[("ct_http_requests_total", (("method", "POST"), ("route", "api/tokens/check"),
                                               ("status", "200")))] == CLIENTS


def test_100_concurrent_consumes_near_the_cap_hold_it_and_lose_nothing(make_user, service_key):
    user = make_user("pro")  # limit 50,000, cap 100,000 (100% overage)
    usage_consume(request=ConsumeRequest(user_id=user.pk, operation_id="seed", tokens=99_000,
                                         operation_type="summary"), ctx=SYSTEM)
    tokens = 37  # 1,000 left: room for 27 of the 100
    headers = {"Authorization": f"Api-Key {service_key}"}
    with run_gunicorn(workers=2, threads=8) as server:
        results = fire_together(CLIENTS, lambda s, i: s.post(
            server.url + "/api/tokens/consume", json={"userId": user.pk, "operationId": f"load-{i}", "tokens": tokens,
                                                      "operationType": "summary"}, headers=headers, timeout=30))
        metrics = scraped(server)
    statuses = [status for status, _ in results]
    created = sorted(i for i, (status, _) in enumerate(results) if status == 201)
    assert sorted(set(statuses)) == [201, 402], statuses
    assert len(created) == 1_000 // tokens == 27
    assert all(body["error"]["code"] == "token_cap_exceeded" for status, body in results if status == 402)
    usage = usage_get(user_id=user.pk)
    assert usage.used == 99_000 + 27 * tokens <= usage.cap
    # every accepted consume is in the ledger exactly once; no refused one is
    recorded = sorted(LedgerEntry.objects.filter(account__user=user, kind="consumption")
                      .exclude(operation_id="seed").values_list("operation_id", flat=True))
    assert recorded == sorted(f"load-{i}" for i in created)
    assert ledger_reconcile() == []
    assert AuditLog.objects.filter(user=user, action="consume", result="recorded").count() == 27 + 1
    assert AuditLog.objects.filter(user=user, action="consume", result="token_cap_exceeded").count() == 73
    assert metrics[("ct_tokens_consumed_total", ())] == 27 * tokens
    assert metrics[("ct_token_requests_refused_total", (("reason", "token_cap_exceeded"),))] == 73


def test_the_limit_holds_across_every_web_process(make_user, service_key):
    from metering.models import Tier

    Tier.objects.filter(slug="basic").update(requests_per_hour=10)
    user = make_user("basic")
    headers = {"Authorization": f"Api-Key {service_key}"}
    with run_gunicorn(workers=2, threads=8) as server:
        results = fire_together(40, lambda s, i: s.get(server.url + f"/api/tokens/usage?userId={user.pk}",
                                                        headers=headers, timeout=30))
    statuses = Counter(status for status, _ in results)
    assert statuses == {200: 10, 429: 30}, statuses  # one shared count in Redis, not 10 per worker
    assert all(body["error"]["code"] == "rate_limited" for status, body in results if status == 429)
    assert AuditLog.objects.filter(user=user, result="rate_limited").count() == 30
