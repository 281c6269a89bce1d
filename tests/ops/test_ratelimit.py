"""Rate limits on real Redis: per user by tier, per service key, per IP on sign-in and
password reset; 429 with the error shape and headers; nothing but an audit row for a
refused request; failing open when the counter store is unreachable."""
from __future__ import annotations

import json
import logging
import time
from datetime import timedelta

import pytest
import redis
import requests
from django.db import transaction
from django.test import Client
from django.utils import timezone
from rest_framework.parsers import JSONParser
from rest_framework.request import Request
from rest_framework.test import APIClient, APIRequestFactory

from billing.models import BillingAccount
from billing.services import subscriptions_expire
from consensus_tokens import metrics
from metering.auth import ServiceKeyAuthentication
from metering.throttling import TokenRateThrottle
from metering.models import Account, AuditLog, LedgerEntry, ServiceKey, Tier
from metering.services import service_key_create, usage_get
from metering.services.keys import hash_key

from .conftest import free_port, run_gunicorn, run_redis

pytestmark = [pytest.mark.django_db, pytest.mark.within_one_period]


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


def test_a_tier_change_applies_to_the_very_next_request_though_limits_are_cached_long(api, make_user, settings):
    settings.RATELIMIT_TIER_CACHE_SECONDS = 3600
    set_tier_rate("pro", 2)
    user = make_user("pro")
    assert [api.get(f"/api/tokens/usage?userId={user.pk}").status_code for _ in range(3)] == [200, 200, 429]
    set_tier_rate("pro", 10)
    again = api.get(f"/api/tokens/usage?userId={user.pk}")
    assert again.status_code == 200 and again["X-RateLimit-Limit"] == "10"
    assert again["X-RateLimit-Remaining"] == "6"  # the hour's 4 requests still count
    set_tier_rate("pro", 3)  # and lowering it refuses at once, no fresh budget
    assert api.get(f"/api/tokens/usage?userId={user.pk}").status_code == 429


def test_support_changing_a_tiers_rate_in_admin_applies_at_once(api, make_user, settings, django_user_model):
    from django.contrib.auth.models import Group
    from django.core.management import call_command

    settings.RATELIMIT_TIER_CACHE_SECONDS = 3600
    user = make_user("basic")
    assert api.get(f"/api/tokens/usage?userId={user.pk}")["X-RateLimit-Limit"] == "100"
    call_command("setup_support_group")
    staff = django_user_model.objects.create_user("sam", "sam@example.com", "pw-for-tests-1", is_staff=True)
    staff.groups.add(Group.objects.get(name="support"))
    support = Client()
    support.force_login(staff)
    basic = Tier.objects.get(slug="basic")
    form = {"name": basic.name, "requests_per_hour": 1, "features": json.dumps(basic.features)}
    assert support.post(f"/admin/metering/tier/{basic.pk}/change/", form).status_code == 302
    refused = api.get(f"/api/tokens/usage?userId={user.pk}")
    assert refused.status_code == 429 and refused["X-RateLimit-Limit"] == "1"


def test_an_accounts_tier_change_applies_at_once(api, make_user, settings, django_user_model):
    """By the support console's action (a comp: billing.services.comps.comp_grant) and by
    billing ending a canceled subscription's access (billing.services.subscriptions_expire)."""
    from django.contrib.auth.models import Group
    from django.core.management import call_command

    settings.RATELIMIT_TIER_CACHE_SECONDS = 3600
    settings.DEFAULT_TIER = "basic"
    set_tier_rate("basic", 2)
    moved, canceled = make_user("enterprise"), make_user("pro")
    assert api.get(f"/api/tokens/usage?userId={moved.pk}")["X-RateLimit-Limit"] == "1000"
    assert api.get(f"/api/tokens/usage?userId={canceled.pk}")["X-RateLimit-Limit"] == "500"

    call_command("setup_support_group")
    staff = django_user_model.objects.create_user("sam", "sam@example.com", "pw-for-tests-1", is_staff=True)
    staff.groups.add(Group.objects.get(name="support"))
    support = Client()
    support.force_login(staff)
    answer = support.post(f"/admin/metering/account/{moved.token_account.pk}/support/comp/",
                          {"tier": Tier.objects.get(slug="pro").pk, "reason": "downgrade asked by phone",
                           "last_day": (timezone.now() + timedelta(days=30)).date().isoformat(), "_confirm": "1"})
    assert answer.status_code == 302
    assert api.get(f"/api/tokens/usage?userId={moved.pk}")["X-RateLimit-Limit"] == "500"

    BillingAccount.objects.create(account=canceled.token_account, subscription_status="canceled",
                                  paid_through=timezone.now() - timedelta(minutes=1))
    assert subscriptions_expire() == 1
    answers = [api.get(f"/api/tokens/usage?userId={canceled.pk}") for _ in range(2)]  # the hour's 2nd and 3rd
    assert [(r.status_code, r["X-RateLimit-Limit"]) for r in answers] == [(200, "2"), (429, "2")]


def test_saves_that_do_not_decide_a_limit_keep_the_cached_limits(api, make_user, settings):
    """An account's status or holds, a tier's prices: no version bump, no re-reading."""
    settings.RATELIMIT_TIER_CACHE_SECONDS = 3600
    user = make_user("basic")
    api.get(f"/api/tokens/usage?userId={user.pk}")
    probe = redis.Redis.from_url(settings.CACHES["ratelimit"]["LOCATION"])
    version = probe.get("rl:ct:limits-version")
    account = user.token_account
    account.billing_hold = True
    account.save(update_fields=["billing_hold"])
    basic = Tier.objects.get(slug="basic")
    basic.monthly_price_cents += 1
    basic.save(update_fields=["monthly_price_cents"])
    assert probe.get("rl:ct:limits-version") == version
    set_tier_rate("basic", 5)
    assert int(probe.get("rl:ct:limits-version")) > int(version or 0)
    probe.close()


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


def client_commands(port: int, action) -> list[str]:
    """The commands clients sent the Redis server on `port` while `action` ran, seen
    with MONITOR (the commands a Lua script runs are reported apart, and left out)."""
    sentinel = f"end-of-action-{time.time_ns()}"
    monitor_client, sentinel_client = redis.Redis(port=port), redis.Redis(port=port)
    sentinel_client.ping()  # connected (its handshake) before anything is watched
    with monitor_client.monitor() as monitor:
        action()
        sentinel_client.echo(sentinel)
        sent = []
        while True:
            command = monitor.next_command()
            if command["command"] == f"ECHO {sentinel}":
                break
            if command["client_type"] != "lua":
                sent.append(command["command"].split(" ", 1)[0].upper())
    monitor_client.close()
    sentinel_client.close()
    return sent


def limits_redis(settings, port: int) -> None:
    settings.CACHES = {**settings.CACHES, "ratelimit": {
        "BACKEND": "django.core.cache.backends.redis.RedisCache", "LOCATION": f"redis://127.0.0.1:{port}/0"}}


def test_counting_a_request_costs_one_redis_command(make_user, settings):
    with run_redis() as (port, _process):
        limits_redis(settings, port)
        _key, raw = service_key_create(name="counted", scope=ServiceKey.Scope.CONSUME)
        client = APIClient()
        client.credentials(HTTP_AUTHORIZATION=f"Api-Key {raw}")
        user = make_user("basic")
        client.get(f"/api/tokens/usage?userId={user.pk}")  # warms the tier and key caches, loads the script
        answers = []
        sent = client_commands(port, lambda: answers.append(client.get(f"/api/tokens/usage?userId={user.pk}")))
        assert sent == ["EVALSHA"]  # the user's and the key's counters, and the limits version
        assert answers[0].status_code == 200 and answers[0]["X-RateLimit-Remaining"] == "98"
        probe = redis.Redis(port=port)
        assert sorted(k.decode().split(":")[2] for k in probe.keys("rl:ct:*:*:*")) == ["service_key", "user"]
        assert all(3600 < probe.ttl(k) <= 3605 for k in probe.keys("rl:ct:*:*:*"))  # period + EXPIRATION_FUDGE
        # A restarted (or flushed) Redis has forgotten the script: it is loaded again, nothing is lost.
        probe.script_flush()
        assert client.get(f"/api/tokens/usage?userId={user.pk}")["X-RateLimit-Remaining"] == "97"
        probe.close()


def test_windows_are_django_ratelimits(settings):
    """The counters' windows are django-ratelimit's (its fixed windows with a per-key
    jitter), computed for a whole batch at once."""
    from django_ratelimit.core import _get_window

    from consensus_tokens.ratelimit import limit_entries

    specs = [("user", uid) for uid in (1, 42, 98765, 2**40)] + [("service_key", 7)]
    for period in (1, 60, 3600):
        while True:  # both read the clock: retry if a second ended in between
            ts = int(time.time())
            entries = limit_entries(specs, period, ts)
            expected = [_get_window(str(value), period) for _, value in specs]
            if int(time.time()) == ts:
                break
        assert [window for _, _, window in entries] == expected
        assert [key for key, _, _ in entries] == [f"rl:ct:{scope}:{value}:{w}" for (scope, value), w in
                                                  zip(specs, expected)]


def bulk_users(count: int, tier: str) -> list[int]:
    from django.contrib.auth import get_user_model

    User = get_user_model()
    prefix = f"bulk{time.time_ns()}-"
    User.objects.bulk_create([User(username=f"{prefix}{i}", password="!") for i in range(count)])
    ids = list(User.objects.filter(username__startswith=prefix).values_list("pk", flat=True))
    Account.objects.bulk_create([Account(user_id=pk, tier=Tier.objects.get(slug=tier)) for pk in ids])
    return ids


def test_a_batch_for_1000_users_is_counted_with_one_redis_command(make_user, settings):
    with run_redis() as (port, _process):
        limits_redis(settings, port)
        _key, raw = service_key_create(name="batches", scope=ServiceKey.Scope.CONSUME)
        client = APIClient()
        client.credentials(HTTP_AUTHORIZATION=f"Api-Key {raw}")
        ids = bulk_users(1000, "pro")

        def batch(run: str):
            operations = [{"userId": uid, "operationId": f"{run}-{uid}", "tokens": 5, "operationType": "summary"}
                          for uid in ids]
            return client.post("/api/tokens/consume/batch", {"operations": operations}, format="json")

        assert batch("warm").status_code == 201
        answers = []
        sent = client_commands(port, lambda: answers.append(batch("counted")))
        assert sent == ["EVALSHA"]
        assert answers[0].status_code == 201
        assert answers[0]["X-RateLimit-Limit"] == "500" and answers[0]["X-RateLimit-Remaining"] == "498"
        probe = redis.Redis(port=port)
        # every user's own counter (a user whose window ended between the batches has two)
        assert {int(k.split(b":")[3]) for k in probe.keys("rl:ct:user:*")} == set(ids)
        probe.close()


def direct_request(raw_key: str, path: str, body: dict | None = None) -> Request:
    """A REST framework request, authenticated, as the throttle sees it in a view."""
    factory = APIRequestFactory()
    auth = {"HTTP_AUTHORIZATION": f"Api-Key {raw_key}"}
    wsgi = factory.post(path, body, format="json", **auth) if body is not None else factory.get(path, **auth)
    request = Request(wsgi, authenticators=[ServiceKeyAuthentication()], parsers=[JSONParser()])
    assert request.user.key.name  # authenticated here, outside what the tests measure
    return request


def test_a_warm_request_issues_no_sql(service_key, make_user, django_assert_num_queries, settings):
    settings.SERVICE_KEY_CACHE_SECONDS = 3600
    user = make_user("pro")
    path = f"/api/tokens/usage?userId={user.pk}"
    first = direct_request(service_key, path)
    with django_assert_num_queries(1):  # a user not seen yet: one lookup
        assert TokenRateThrottle().allow_request(first, None)
    request = direct_request(service_key, path)
    with django_assert_num_queries(0):
        assert TokenRateThrottle().allow_request(request, None)
    assert request._request.ratelimit.limit == 500 and request._request.ratelimit.count == 2


def test_a_warm_batch_for_1000_users_issues_no_sql(service_key, django_assert_num_queries, settings):
    settings.SERVICE_KEY_CACHE_SECONDS = 3600
    ids = bulk_users(1000, "enterprise")
    body = {"operations": [{"userId": uid, "operationId": f"op-{uid}", "tokens": 5, "operationType": "summary"}
                           for uid in ids]}
    first = direct_request(service_key, "/api/tokens/consume/batch", body)
    with django_assert_num_queries(1):  # one lookup for the 1,000
        assert TokenRateThrottle().allow_request(first, None)
    request = direct_request(service_key, "/api/tokens/consume/batch", body)
    with django_assert_num_queries(0):
        assert TokenRateThrottle().allow_request(request, None)
    assert request._request.ratelimit.scope == "user" and request._request.ratelimit.limit == 1000
    set_tier_rate("enterprise", 999)  # and the next batch reads the limits again, at once
    request = direct_request(service_key, "/api/tokens/consume/batch", body)
    with django_assert_num_queries(1):
        assert TokenRateThrottle().allow_request(request, None)
    assert request._request.ratelimit.limit == 999 and request._request.ratelimit.count == 3


def test_without_redis_limits_count_in_local_memory(api, make_user, settings):
    settings.CACHES = {**settings.CACHES, "ratelimit": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache",
                                                        "LOCATION": "ratelimit-test"}}
    settings.RATELIMIT_TIER_CACHE_SECONDS = 3600
    set_tier_rate("basic", 2)
    user = make_user("basic")
    answers = [api.get(f"/api/tokens/usage?userId={user.pk}") for _ in range(3)]
    assert [(r.status_code, r["X-RateLimit-Remaining"]) for r in answers] == [(200, "1"), (200, "0"), (429, "0")]
    set_tier_rate("basic", 5)  # this process drops its cached limits itself
    again = api.get(f"/api/tokens/usage?userId={user.pk}")
    assert again.status_code == 200 and again["X-RateLimit-Limit"] == "5" and again["X-RateLimit-Remaining"] == "1"


def test_a_tier_change_while_redis_is_down_still_saves_and_applies_here(api, make_user, settings, caplog):
    user = make_user("basic")
    assert api.get(f"/api/tokens/usage?userId={user.pk}")["X-RateLimit-Limit"] == "100"
    real = settings.CACHES["ratelimit"]
    settings.CACHES = {**settings.CACHES, "ratelimit": {
        "BACKEND": "django.core.cache.backends.redis.RedisCache",
        "LOCATION": f"redis://127.0.0.1:{free_port()}/0",  # nothing listens there
        "OPTIONS": {"socket_connect_timeout": 0.25, "socket_timeout": 0.25}}}
    with caplog.at_level(logging.WARNING, logger="consensus_tokens.ratelimit"):
        set_tier_rate("basic", 7)
    assert Tier.objects.get(slug="basic").requests_per_hour == 7
    assert any("other workers keep their cached limits" in r.getMessage() for r in caplog.records)
    settings.CACHES = {**settings.CACHES, "ratelimit": real}
    assert api.get(f"/api/tokens/usage?userId={user.pk}")["X-RateLimit-Limit"] == "7"


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


@pytest.mark.django_db(transaction=True)
def test_another_worker_follows_a_tier_change_once_it_is_committed(make_user, service_key):
    """A real second process, its limits cached for an hour: a change inside a
    transaction bumps the version at once (the worker re-reads, and still finds the old
    row) and again at commit (the worker re-reads the new one)."""
    set_tier_rate("pro", 2)
    user = make_user("pro")
    with run_gunicorn(workers=1, threads=1, env={"RATELIMIT_TIER_CACHE_SECONDS": "3600"}) as server:
        def limit() -> str:
            response = requests.get(f"{server.url}/api/tokens/usage?userId={user.pk}",
                                    headers={"Authorization": f"Api-Key {service_key}"}, timeout=30)
            assert response.status_code == 200
            return response.headers["X-RateLimit-Limit"]

        assert limit() == "2"
        with transaction.atomic():
            set_tier_rate("pro", 10)
            assert limit() == "2"  # not committed: the old row is all anyone else can read
        assert limit() == "10"



def test_tier_limits_are_cached_again_after_the_limits_version_starts_over(make_user, django_assert_num_queries):
    """Redis restarted without its data counts the limits version from 1 again: the
    workers' caches must follow it down, not stop caching."""
    from metering.throttling import _TierLimits

    user = make_user("pro")
    limits = _TierLimits()
    assert limits.get([user.pk], 41)[user.pk][:2] == (500, True)
    Tier.objects.filter(slug="pro").update(requests_per_hour=5)  # changed while Redis was away
    with django_assert_num_queries(1):
        assert limits.get([user.pk], 1)[user.pk][:2] == (5, True)
    with django_assert_num_queries(0):
        assert limits.get([user.pk], 1)[user.pk][:2] == (5, True)
