"""Rate limits on real Redis: per user by tier, per service key, per IP on sign-in and
password reset; 429 with the error shape and headers; nothing but an audit row for a
refused request; failing open when the counter store is unreachable."""
from __future__ import annotations

import logging
import time

import pytest
import redis
from django.test import Client
from rest_framework.test import APIClient

from consensus_tokens import metrics
from metering.models import AuditLog, LedgerEntry, ServiceKey, Tier
from metering.services import service_key_create, usage_get
from metering.services.keys import hash_key

from .conftest import free_port, run_redis

pytestmark = pytest.mark.django_db


def set_tier_rate(slug: str, per_hour: int) -> None:
    tier = Tier.objects.get(slug=slug)
    tier.requests_per_hour = per_hour
    tier.save(update_fields=["requests_per_hour"])


def consume(api, user, op: str, tokens: int = 10):
    return api.post("/api/tokens/consume", {"userId": user.pk, "operationId": op, "tokens": tokens,
                                            "operationType": "summary"}, format="json")


def assert_rate_headers(response, *, limit: int, remaining: int) -> None:
    assert response["X-RateLimit-Limit"] == str(limit)
    assert response["X-RateLimit-Remaining"] == str(remaining)
    reset = int(response["X-RateLimit-Reset"])
    assert time.time() <= reset <= time.time() + 3600 + 1


def test_user_limit_follows_the_tier_and_answers_429_with_shape_and_headers(api, make_user):
    set_tier_rate("basic", 3)
    user = make_user("basic")
    for remaining in (2, 1, 0):
        response = api.get(f"/api/tokens/usage?userId={user.pk}")
        assert response.status_code == 200
        assert_rate_headers(response, limit=3, remaining=remaining)

    refused = api.get(f"/api/tokens/usage?userId={user.pk}")
    assert refused.status_code == 429
    body = refused.json()
    assert body["error"]["code"] == "rate_limited" and body["error"]["scope"] == "user"
    assert "3 requests per hour" in body["error"]["message"]
    assert_rate_headers(refused, limit=3, remaining=0)
    retry_after = int(refused["Retry-After"])
    assert 1 <= retry_after <= 3600
    assert retry_after == body["error"]["retryAfter"]
    assert abs(int(refused["X-RateLimit-Reset"]) - (time.time() + retry_after)) <= 2
    row = AuditLog.objects.get(result="rate_limited")
    assert row.user_id == user.pk and row.action == "usage" and row.request_id == refused["X-Request-ID"]


def test_each_tier_has_its_own_limit(api, make_user):
    for slug, per_hour in (("basic", 100), ("pro", 500), ("enterprise", 1000)):
        response = api.get(f"/api/tokens/usage?userId={make_user(slug).pk}")
        assert response["X-RateLimit-Limit"] == str(per_hour)


def test_a_refused_consume_leaves_only_its_audit_row(api, make_user):
    set_tier_rate("basic", 1)
    user = make_user("basic")
    assert consume(api, user, "op-1", tokens=40).status_code == 201
    refused = consume(api, user, "op-2", tokens=70)
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "rate_limited"

    assert list(LedgerEntry.objects.filter(account__user=user).values_list("operation_id", flat=True)) == ["op-1"]
    assert usage_get(user_id=user.pk).used == 40
    rows = list(AuditLog.objects.filter(user=user).order_by("id").values_list("action", "result", "tokens",
                                                                              "operation_id"))
    assert rows == [("consume", "recorded", 40, "op-1"), ("consume", "rate_limited", 70, "")]


def test_a_service_spends_each_users_budget_not_one_shared(api, make_user):
    set_tier_rate("basic", 2)
    alice, bob = make_user("basic"), make_user("basic")
    assert [consume(api, alice, f"a-{i}").status_code for i in range(3)] == [201, 201, 429]
    # bob's budget is untouched by alice's, though the same service key asks for both
    assert [consume(api, bob, f"b-{i}").status_code for i in range(2)] == [201, 201]


def test_a_batch_counts_against_every_user_in_it(api, make_user):
    set_tier_rate("basic", 2)
    alice, bob = make_user("basic"), make_user("basic")
    assert consume(api, alice, "a-1").status_code == 201
    assert consume(api, alice, "a-2").status_code == 201
    batch = {"operations": [{"userId": bob.pk, "operationId": "b-1", "tokens": 5, "operationType": "summary"},
                            {"userId": alice.pk, "operationId": "a-3", "tokens": 5, "operationType": "summary"}]}
    refused = api.post("/api/tokens/consume/batch", batch, format="json")
    assert refused.status_code == 429 and refused.json()["error"]["scope"] == "user"
    assert not LedgerEntry.objects.filter(account__user=bob).exists()
    assert LedgerEntry.objects.filter(account__user=alice).count() == 2


def test_the_service_key_has_its_own_ceiling(make_user):
    key, raw = service_key_create(name="small", scope=ServiceKey.Scope.CONSUME)
    key.requests_per_hour = 3
    key.save(update_fields=["requests_per_hour"])
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Api-Key {raw}")
    users = [make_user("enterprise") for _ in range(4)]
    statuses = [client.get(f"/api/tokens/usage?userId={u.pk}") for u in users]
    assert [r.status_code for r in statuses] == [200, 200, 200, 429]
    refused = statuses[-1]
    assert refused.json()["error"]["scope"] == "service_key"
    assert_rate_headers(refused, limit=3, remaining=0)
    assert AuditLog.objects.get(result="rate_limited").detail["scope"] == "service_key"


def test_a_staff_change_to_the_tier_applies_within_seconds(api, make_user, settings):
    settings.RATELIMIT_TIER_CACHE_SECONDS = 0.3
    set_tier_rate("pro", 2)
    user = make_user("pro")
    assert [api.get(f"/api/tokens/usage?userId={user.pk}").status_code for _ in range(3)] == [200, 200, 429]
    set_tier_rate("pro", 10)
    time.sleep(0.35)
    again = api.get(f"/api/tokens/usage?userId={user.pk}")
    assert again.status_code == 200 and again["X-RateLimit-Limit"] == "10"
    assert again["X-RateLimit-Remaining"] == "6"  # the hour's 4 requests still count
    set_tier_rate("pro", 3)  # and lowering it refuses at once, no fresh budget
    time.sleep(0.35)
    assert api.get(f"/api/tokens/usage?userId={user.pk}").status_code == 429


def test_a_signed_in_user_is_limited_by_their_own_tier(make_user):
    set_tier_rate("basic", 2)
    user = make_user("basic")
    client = APIClient()
    client.force_login(user)
    assert [client.get("/api/tokens/usage").status_code for _ in range(3)] == [200, 200, 429]


def test_endpoints_outside_the_token_api_are_not_limited_per_user(api, make_user):
    set_tier_rate("basic", 1)
    assert api.get("/api/schema/").status_code == 200
    assert api.get("/api/schema/").status_code == 200
    assert "X-RateLimit-Limit" not in api.get("/api/schema/")


@pytest.mark.parametrize("path", ["/admin/login/", "/accounts/login/", "/accounts/password_reset/"])
def test_sign_in_and_password_reset_are_limited_per_ip(path, settings):
    settings.RATELIMIT_IP_PATHS = {path: "3/h"}  # an hour: no window edge falls inside the test
    attacker = Client(REMOTE_ADDR="203.0.113.7")
    form = {"username": "alice", "password": "wrong", "email": "alice@example.com"}
    answers = [attacker.post(path, form) for _ in range(4)]
    assert [r.status_code for r in answers[:3]] in ([200] * 3, [302] * 3)
    refused = answers[3]
    assert refused.status_code == 429
    assert int(refused["Retry-After"]) >= 1 and refused["X-RateLimit-Limit"] == "3"
    assert refused["X-RateLimit-Remaining"] == "0"
    json_refused = attacker.post(path, form, HTTP_ACCEPT="application/json")
    assert json_refused.status_code == 429 and json_refused.json()["error"]["code"] == "rate_limited"
    # another address is not affected, and GET (showing the form) is never limited
    assert Client(REMOTE_ADDR="198.51.100.9").post(path, form).status_code in (200, 302)
    assert attacker.get(path).status_code == 200
    row = AuditLog.objects.filter(result="rate_limited").first()
    assert row.client_ip == "203.0.113.7" and row.action in ("login", "password_reset")


def test_an_unreachable_store_fails_open_with_a_warning_and_a_metric(api, make_user, settings, caplog):
    set_tier_rate("basic", 1)
    settings.CACHES = {**settings.CACHES, "ratelimit": {
        "BACKEND": "django.core.cache.backends.redis.RedisCache",
        "LOCATION": f"redis://127.0.0.1:{free_port()}/0",  # nothing listens there
        "OPTIONS": {"socket_connect_timeout": 0.25, "socket_timeout": 0.25}}}
    settings.RATELIMIT_IP_PATHS = {"/admin/login/": "1/m"}
    user = make_user("basic")
    before = metrics.ratelimit_backend_errors._value.get()
    with caplog.at_level(logging.WARNING, logger="consensus_tokens.ratelimit"):
        answers = [consume(api, user, f"op-{i}") for i in range(3)]
        logins = [Client().post("/admin/login/", {"username": "x", "password": "y"}) for _ in range(2)]
    assert [r.status_code for r in answers] == [201, 201, 201]  # limit 1, but nothing counts: open
    assert all("X-RateLimit-Limit" not in r for r in answers)
    assert [r.status_code for r in logins] == [200, 200]
    assert usage_get(user_id=user.pk).used == 30  # metering carried on, on PostgreSQL
    warnings = [r for r in caplog.records if "rate limit store unreachable" in r.getMessage()]
    assert len(warnings) == 1  # logged once, not once per request
    assert metrics.ratelimit_backend_errors._value.get() - before == 5


def test_counting_a_request_costs_one_pipelined_round_trip(make_user, settings):
    with run_redis() as (port, _process):
        settings.CACHES = {**settings.CACHES, "ratelimit": {
            "BACKEND": "django.core.cache.backends.redis.RedisCache", "LOCATION": f"redis://127.0.0.1:{port}/0"}}
        key, raw = service_key_create(name="counted", scope=ServiceKey.Scope.CONSUME)
        client = APIClient()
        client.credentials(HTTP_AUTHORIZATION=f"Api-Key {raw}")
        user = make_user("basic")
        client.get(f"/api/tokens/usage?userId={user.pk}")  # warms the tier and key caches
        probe = redis.Redis(port=port)
        before = probe.info("commandstats")
        assert client.get(f"/api/tokens/usage?userId={user.pk}").status_code == 200
        after = probe.info("commandstats")
        calls = {name: after[name]["calls"] - before.get(name, {"calls": 0})["calls"] for name in after}
        calls = {name: n for name, n in calls.items() if n and name != "cmdstat_info"}
        # the user's and the key's counters: INCR and EXPIRE each, sent together
        assert calls == {"cmdstat_incrby": 2, "cmdstat_expire": 2}
        assert len(probe.keys("rl:*")) == 2
        probe.close()


def test_a_malformed_body_still_answers_malformed_json(api):
    response = api.post("/api/tokens/consume", "{not json", content_type="application/json")
    assert response.status_code == 400 and response.json()["error"]["code"] == "malformed_json"
    assert response["X-RateLimit-Limit"] == str(ServiceKey.objects.get().requests_per_hour)


def test_revoked_and_unknown_keys_are_refused_before_any_counting(api, service_key):
    ServiceKey.objects.get(hashed_key=hash_key(service_key))  # exists
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION="Api-Key nope")
    response = client.get("/api/tokens/usage?userId=1")
    assert response.status_code == 401 and "X-RateLimit-Limit" not in response


def test_an_unknown_user_counts_against_the_default_tier_and_is_audited_without_a_user(api):
    set_tier_rate("basic", 1)
    first = api.get("/api/tokens/usage?userId=987654321")
    assert first.status_code == 404 and first["X-RateLimit-Limit"] == "1"
    refused = api.get("/api/tokens/usage?userId=987654321")
    assert refused.status_code == 429
    row = AuditLog.objects.get(result="rate_limited")
    assert row.user_id is None and row.detail["key"] == "987654321"


def test_a_tier_with_no_requests_refuses_every_call(api, make_user):
    set_tier_rate("basic", 0)
    response = api.get(f"/api/tokens/usage?userId={make_user('basic').pk}")
    assert response.status_code == 429 and response["X-RateLimit-Limit"] == "0"


def test_a_hung_redis_costs_a_timeout_not_a_hang(api, make_user, settings):
    import os
    import signal

    with run_redis() as (port, process):
        url = f"redis://127.0.0.1:{port}/0"
        settings.CACHES = {
            "default": {**settings.CACHES["default"], "LOCATION": url},
            "ratelimit": {**settings.CACHES["ratelimit"], "LOCATION": url}}
        user = make_user("basic")
        body = {"userId": user.pk, "operationType": "summary", "topic": "hung redis " * 20}
        assert api.post("/api/tokens/estimate", body, format="json").status_code == 200
        os.kill(process.pid, signal.SIGSTOP)  # accepts connections, answers nothing
        try:
            started = time.monotonic()
            response = api.post("/api/tokens/estimate", body, format="json")
            elapsed = time.monotonic() - started
            consumed = consume(api, user, "while-hung")
        finally:
            os.kill(process.pid, signal.SIGCONT)
    assert response.status_code == 200 and response.json()["cached"] is False
    assert elapsed < 4  # the limit's 0.25 s and the cache's 1 s timeouts, not forever
    assert consumed.status_code == 201 and "X-RateLimit-Limit" not in consumed


def test_one_user_past_their_limit_cannot_use_up_the_service_keys_ceiling(make_user):
    set_tier_rate("basic", 1)
    key, raw = service_key_create(name="shared", scope=ServiceKey.Scope.CONSUME)
    key.requests_per_hour = 5
    key.save(update_fields=["requests_per_hour"])
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Api-Key {raw}")
    noisy = make_user("basic")
    assert [client.get(f"/api/tokens/usage?userId={noisy.pk}").status_code for _ in range(10)] == [200] + [429] * 9
    others = [make_user("basic") for _ in range(5)]
    answers = [client.get(f"/api/tokens/usage?userId={u.pk}") for u in others]
    # the noisy user's 9 refused calls were not charged to the key: 4 of its 5 remain
    assert [r.status_code for r in answers] == [200, 200, 200, 200, 429]
    assert answers[-1].json()["error"]["scope"] == "service_key"
    assert answers[0]["X-RateLimit-Limit"] == "1" and answers[3]["X-RateLimit-Remaining"] == "0"
