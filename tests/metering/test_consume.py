"""POST /api/tokens/consume: exactly once per (user, operation id), the same
answer from either path, and data-driven operation types and providers."""
from __future__ import annotations

import pytest
from django.conf import settings

from metering.models import LedgerEntry, OperationType, Provider, Tier
from metering.services import account_change_tier, account_for_user, ledger_reconcile

from .conftest import consume_body, current_period

pytestmark = pytest.mark.django_db

CONSUME = "/api/tokens/consume"


@pytest.fixture(params=[True, False], ids=["fast", "orm"])
def path(request, settings):
    settings.METERING_FAST_PATH = request.param
    return request.param


def _stored(user, operation_id: str) -> dict:
    return LedgerEntry.objects.get(account__user=user, operation_id=operation_id, kind="consumption").response


def test_fast_and_orm_paths_answer_alike(api, make_user, settings, spend):
    bodies = []
    for fast in (True, False):
        settings.METERING_FAST_PATH = fast
        user = make_user("enterprise")
        spend(user, 201_000)  # past the limit already: this consume crosses no alert threshold
        response = api.post(CONSUME, consume_body(user, "same", 2_234, "consensus", provider="anthropic",
                                                  model="claude-sonnet-4", estimatedTokens=2_000), format="json")
        assert response.status_code == 201, response.content
        # the single statement stores the usage after it raw; the ORM path the body itself
        assert ("usageAfter" in _stored(user, "same")) is fast
        bodies.append(response.json())
    for body in bodies:
        assert set(body) == {"operationId", "entryId", "tokens", "recordedAt", "usage"}
        assert body["recordedAt"].endswith("Z")
        body.pop("entryId"), body.pop("recordedAt")
    assert bodies[0] == bodies[1]
    assert bodies[0]["usage"] == {**bodies[0]["usage"], "tier": "enterprise", "used": 203_234, "reserved": 0,
                                  "usagePercentage": 101.61, "status": "exceeded",
                                  "overage": {"tokens": 3_234, "charge": "2.5872"}}


@pytest.mark.parametrize("before, tokens", [(7_400, 100), (8_950, 100), (9_990, 10), (9_990, 20), (0, 9_000)])
def test_a_consume_that_crosses_a_threshold_is_left_to_the_transactional_path(api, make_user, settings, spend,
                                                                               before, tokens):
    """75%, 90%, exactly 100%, the entry into overage, several at once: the ORM path answers and
    records the alert in its transaction; the single statement changes nothing first."""
    settings.METERING_FAST_PATH = True
    user = make_user("basic")
    if before:
        spend(user, before)
    response = api.post(CONSUME, consume_body(user, "crossing", tokens), format="json")
    assert response.status_code == 201, response.content
    assert "usageAfter" not in _stored(user, "crossing")
    assert current_period(user).used == before + tokens
    assert ledger_reconcile() == []


def test_a_consume_that_crosses_nothing_takes_the_single_statement(api, make_user, settings, spend):
    settings.METERING_FAST_PATH = True
    user = make_user("basic")
    spend(user, 7_500)  # exactly 75% already: the next token crosses nothing until 90%
    response = api.post(CONSUME, consume_body(user, "plain", 1_499), format="json")
    assert response.status_code == 201, response.content
    assert "usageAfter" in _stored(user, "plain")
    assert response.json()["usage"]["used"] == 8_999


def test_replay_answers_200_with_the_same_body(api, make_user, path):
    user = make_user()
    body = consume_body(user, "op", 120, provider="openai", model="gpt-4o", estimatedTokens=100)
    first = api.post(CONSUME, body, format="json")
    assert first.status_code == 201 and "Idempotent-Replayed" not in first
    again = api.post(CONSUME, body, format="json")
    assert again.status_code == 200 and again["Idempotent-Replayed"] == "true"
    assert again.json() == first.json()
    assert current_period(user).used == 120


@pytest.mark.parametrize("change", [{"tokens": 121}, {"operationType": "analysis"}, {"provider": "anthropic"},
                                    {"model": "gpt-4.1"}, {"estimatedTokens": 99}, {"estimatedTokens": None}])
def test_same_operation_id_with_another_body_is_409(api, make_user, path, change):
    user = make_user()
    body = consume_body(user, "op", 120, provider="openai", model="gpt-4o", estimatedTokens=100)
    api.post(CONSUME, body, format="json")
    conflict = api.post(CONSUME, {**body, **change}, format="json")
    assert conflict.status_code == 409
    assert conflict.json()["error"]["code"] == "operation_id_conflict"
    assert current_period(user).used == 120
    assert LedgerEntry.objects.count() == 1


def test_operation_ids_are_per_user(api, make_user, path):
    a, b = make_user(), make_user()
    assert api.post(CONSUME, consume_body(a, "shared", 10), format="json").status_code == 201
    assert api.post(CONSUME, consume_body(b, "shared", 20), format="json").status_code == 201
    assert (current_period(a).used, current_period(b).used) == (10, 20)


def test_a_refusal_is_not_remembered(api, make_user, path, spend):
    user = make_user()
    spend(user, 14_950)
    body = consume_body(user, "later", 100)
    refused = api.post(CONSUME, body, format="json")
    assert refused.status_code == 402
    assert refused.json()["error"] == {**refused.json()["error"], "code": "token_cap_exceeded", "available": 50,
                                       "cap": 15_000}
    assert current_period(user).used == 14_950
    account_change_tier(account=account_for_user(user_id=user.pk), tier=Tier.objects.get(slug="pro"), actor="s",
                        reason="upgrade")
    assert api.post(CONSUME, body, format="json").status_code == 201  # the same operation id, now with room
    assert current_period(user).used == 15_050


def test_the_largest_request_is_allowed_through_validation(api, make_user, path):
    user = make_user("enterprise")  # cap 600,000
    maximum = api.post(CONSUME, consume_body(user, "max", settings.MAX_TOKENS_PER_REQUEST), format="json")
    assert maximum.status_code == 402  # valid, but past this user's cap
    over = api.post(CONSUME, consume_body(user, "max", settings.MAX_TOKENS_PER_REQUEST + 1), format="json")
    assert over.status_code == 400
    assert api.post(CONSUME, consume_body(user, "cap", 600_000), format="json").status_code == 201


def test_a_user_without_a_tier_cannot_spend(api, make_user, path):
    user = make_user(tier=None)
    refused = api.post(CONSUME, consume_body(user, "x", 1), format="json")
    assert refused.status_code == 402
    usage = api.get(f"/api/tokens/usage?userId={user.pk}").json()
    assert (usage["tier"], usage["limit"], usage["cap"]) == (None, 0, 0)


def test_new_operation_types_and_providers_need_no_deploy(api, make_user, path):
    user = make_user()
    OperationType.objects.create(slug="translation", name="Translation", base_tokens=150)
    Provider.objects.create(slug="cohere", name="Cohere", counting="calibrated", default_encoding="o200k_base",
                            calibration_factor="1.1")
    consumed = api.post(CONSUME, consume_body(user, "t", 10, "translation", provider="cohere"), format="json")
    assert consumed.status_code == 201, consumed.content
    estimate = api.post("/api/tokens/estimate", {"userId": user.pk, "operationType": "translation",
                                                 "provider": "cohere", "topic": ""}, format="json").json()
    assert (estimate["tokens"], estimate["provider"], estimate["encoding"]) == (150, "cohere", "o200k_base")


def test_retired_operation_types_and_providers_are_refused(api, make_user, path):
    user = make_user()
    OperationType.objects.filter(slug="comparison").update(active=False)
    Provider.objects.filter(slug="anthropic").update(active=False)
    gone = api.post(CONSUME, consume_body(user, "c", 10, "comparison"), format="json")
    assert gone.status_code == 400 and gone.json()["error"]["code"] == "unknown_operation_type"
    gone = api.post(CONSUME, consume_body(user, "a", 10, provider="anthropic"), format="json")
    assert gone.status_code == 400 and gone.json()["error"]["code"] == "unknown_provider"
    assert not LedgerEntry.objects.exists()
    assert ledger_reconcile() == []


@pytest.mark.django_db(transaction=True)
def test_a_dropped_database_connection_is_reopened_and_the_consume_recorded_once(make_user, settings):
    """The single statement skips Django's per-request health-check query: when the server has dropped
    the persistent connection, it reconnects and runs again (safe: idempotent per operation id)."""
    from django.db import connection, connections

    from metering.services import ConsumeRequest, usage_consume
    from metering.services.context import RequestContext

    settings.METERING_FAST_PATH = True
    user = make_user()
    ctx = RequestContext()
    usage_consume(request=ConsumeRequest(user_id=user.pk, operation_id="a", tokens=10, operation_type="summary"),
                  ctx=ctx)
    backend_pid = connection.connection.info.backend_pid
    other = connections.create_connection("default")
    try:
        with other.cursor() as cursor:
            cursor.execute("SELECT pg_terminate_backend(%s)", [backend_pid])
    finally:
        other.close()
    result = usage_consume(request=ConsumeRequest(user_id=user.pk, operation_id="b", tokens=20,
                                                  operation_type="summary"), ctx=ctx)
    assert not result.replayed and result.body["usage"]["used"] == 30
    assert connection.connection.info.backend_pid != backend_pid
    assert current_period(user).used == 30
    assert ledger_reconcile() == []


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "orm"])
def test_the_largest_limits_do_not_overflow(api, make_user, settings, spend, fast):
    """A tier's limit may be as large as its column allows; % arithmetic on it passes 2^31."""
    from decimal import Decimal

    settings.METERING_FAST_PATH = fast
    Tier.objects.create(slug="huge", name="Huge", monthly_token_limit=2_147_483_647, overage_rate=Decimal("0.0001"),
                        allow_overage=False)
    user = make_user("huge")
    settings.MAX_TOKENS_PER_REQUEST = 2_000_000_000  # the service's own check, for the setup spend only
    spend(user, 1_610_000_000)  # 75% is 1,610,612,735.25
    quiet = api.post(CONSUME, consume_body(user, "below", 100), format="json")
    assert quiet.status_code == 201, quiet.content
    assert ("usageAfter" in _stored(user, "below")) is fast
    crossing = api.post(CONSUME, consume_body(user, "past-75", 1_000_000), format="json")
    assert crossing.status_code == 201, crossing.content
    assert crossing.json()["usage"]["used"] == 1_611_000_100
    assert current_period(user).used == 1_611_000_100


@pytest.mark.parametrize("operation_type, provider, model, reservation_id, estimated", [
    ("summary", "openai", "", "", None),
    ("analysis", "", "gpt-4o", "0b0c6a52-3f55-4c8e-9d57-2d1f1c7b9a10", 0),
    ("quo\"te", "back\\slash", "tab\there\nnewline", "é ünïcode 漢字 🙂", 2**31),
    ("\x01\x1f control", "/slash/", "ascii only", "", 999_999),
])
def test_the_fingerprint_is_the_sha256_of_the_json_array_it_always_was(operation_type, provider, model,
                                                                       reservation_id, estimated):
    """Every consumption stores its fingerprint and a replay compares against it, so the
    faster formatting must give exactly what json.dumps gave."""
    import hashlib
    import json

    from metering.services import ConsumeRequest

    for tokens in (1, 123_456, 1_000_000):
        request = ConsumeRequest(user_id=7, operation_id="op", tokens=tokens, operation_type=operation_type,
                                 provider=provider, model=model, reservation_id=reservation_id,
                                 estimated_tokens=estimated)
        body = [tokens, operation_type, provider, model, reservation_id, estimated]
        assert request.fingerprint() == hashlib.sha256(json.dumps(body, separators=(",", ":")).encode()).hexdigest()
