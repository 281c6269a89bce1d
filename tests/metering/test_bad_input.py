"""Bad input of every kind, on every endpoint: a 4xx with the error shape and a
stable code, never a 500, and nothing recorded."""
from __future__ import annotations

import json
import uuid

import pytest
from django.conf import settings

from metering.models import LedgerEntry, Reservation, UsagePeriod

pytestmark = pytest.mark.django_db

MAX = settings.MAX_TOKENS_PER_REQUEST
MISSING = object()
UNKNOWN_USER_ID = 9_000_000_000


def assert_error(response, status: int, code: str, field: str | None = None) -> dict:
    assert response.status_code == status, (response.status_code, response.content[:500])
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert error["code"] == code, error
    assert isinstance(error["message"], str) and error["message"]
    if "fields" in error:
        assert isinstance(error["fields"], dict) and error["fields"]
    if field is not None:
        assert field in error.get("fields", {}), error
    return error


def with_change(base: dict, key: str, value) -> dict:
    body = dict(base)
    if value is MISSING:
        body.pop(key, None)
    else:
        body[key] = value
    return body


@pytest.fixture
def user(make_user):
    return make_user("basic")


@pytest.fixture(autouse=True)
def nothing_recorded(db):
    """Whatever the bad request, no counter and no ledger row may change."""
    yield
    assert not LedgerEntry.objects.exists()
    assert not UsagePeriod.objects.filter(used__gt=0).exists()
    assert not UsagePeriod.objects.filter(reserved__gt=0).exists()
    assert not Reservation.objects.exists()


BAD_TOKENS = [
    pytest.param(MISSING, id="missing"),
    pytest.param(None, id="null"),
    pytest.param(True, id="true"),
    pytest.param(False, id="false"),
    pytest.param("100", id="numeric-string"),
    pytest.param("abc", id="string"),
    pytest.param(100.0, id="float-integral"),
    pytest.param(10.5, id="float"),
    pytest.param(-5, id="negative"),
    pytest.param(0, id="zero"),
    pytest.param(MAX + 1, id="over-max"),
    pytest.param(10**30, id="huge"),
    pytest.param([100], id="list"),
    pytest.param({"n": 100}, id="object"),
]

BAD_USER_IDS = [
    pytest.param(MISSING, id="missing"),
    pytest.param(None, id="null"),
    pytest.param(True, id="true"),
    pytest.param("1", id="string"),
    pytest.param(1.0, id="float"),
    pytest.param(0, id="zero"),
    pytest.param(-1, id="negative"),
    pytest.param(2**63, id="past-bigint"),
    pytest.param(10**40, id="huge"),
]


def consume_base(user) -> dict:
    return {"userId": user.pk, "operationId": "op-1", "tokens": 100, "operationType": "summary"}


def check_base(user) -> dict:
    return {"userId": user.pk, "tokens": 100}


def reserve_base(user) -> dict:
    return {"userId": user.pk, "tokens": 100, "reserve": True, "operationId": "hold-1"}


def estimate_base(user) -> dict:
    return {"userId": user.pk, "operationType": "summary", "provider": "openai", "topic": "t", "sources": []}


def release_base(user) -> dict:
    return {"userId": user.pk, "reservationId": str(uuid.uuid4())}


def batch_base(user) -> dict:
    return {"operations": [consume_base(user)]}


TOKEN_ENDPOINTS = [
    pytest.param("/api/tokens/consume", consume_base, id="consume"),
    pytest.param("/api/tokens/check", check_base, id="check"),
    pytest.param("/api/tokens/check", reserve_base, id="reserve"),
]
ALL_POST_ENDPOINTS = [
    *TOKEN_ENDPOINTS,
    pytest.param("/api/tokens/estimate", estimate_base, id="estimate"),
    pytest.param("/api/tokens/release", release_base, id="release"),
    pytest.param("/api/tokens/consume/batch", batch_base, id="batch"),
]


@pytest.mark.parametrize("path,base", TOKEN_ENDPOINTS)
@pytest.mark.parametrize("tokens", BAD_TOKENS)
def test_tokens_must_be_a_positive_integer_up_to_the_maximum(api, user, path, base, tokens):
    response = api.post(path, with_change(base(user), "tokens", tokens), format="json")
    assert_error(response, 400, "invalid_request", field="tokens")


@pytest.mark.parametrize("tokens", BAD_TOKENS)
def test_batch_item_tokens_are_validated_like_a_single_consume(api, user, tokens):
    operations = [consume_base(user), with_change({**consume_base(user), "operationId": "op-2"}, "tokens", tokens)]
    error = assert_error(api.post("/api/tokens/consume/batch", {"operations": operations}, format="json"),
                         400, "invalid_request", field="operations")
    assert error["index"] == 1
    assert "tokens" in error["fields"]["operations"]["1"]


@pytest.mark.parametrize("path,base", ALL_POST_ENDPOINTS[:-1])
@pytest.mark.parametrize("user_id", BAD_USER_IDS)
def test_user_id_must_be_a_positive_integer(api, user, path, base, user_id):
    response = api.post(path, with_change(base(user), "userId", user_id), format="json")
    assert_error(response, 400, "invalid_request", field="userId")


@pytest.mark.parametrize("path,base", ALL_POST_ENDPOINTS)
@pytest.mark.parametrize("unknown", [UNKNOWN_USER_ID, 2**31, 2**63 - 1], ids=["9e9", "past-int32", "max-bigint"])
def test_unknown_user_is_404_unknown_user(api, user, path, base, unknown):
    body = base(user)
    if "operations" in body:
        body["operations"][0]["userId"] = unknown
    else:
        body["userId"] = unknown
    assert_error(api.post(path, body, format="json"), 404, "unknown_user")


@pytest.mark.parametrize("path,base", [
    pytest.param("/api/tokens/consume", consume_base, id="consume"),
    pytest.param("/api/tokens/check", lambda u: {**check_base(u), "operationType": "summary"}, id="check"),
    pytest.param("/api/tokens/check", lambda u: {**reserve_base(u), "operationType": "summary"}, id="reserve"),
    pytest.param("/api/tokens/estimate", estimate_base, id="estimate"),
])
def test_unknown_operation_type_is_refused(api, user, path, base):
    body = with_change(base(user), "operationType", "teleportation")
    assert_error(api.post(path, body, format="json"), 400, "unknown_operation_type")


@pytest.mark.parametrize("path,base", [
    pytest.param("/api/tokens/consume", consume_base, id="consume"),
    pytest.param("/api/tokens/estimate", estimate_base, id="estimate"),
])
def test_unknown_provider_is_refused(api, user, path, base):
    body = with_change(base(user), "provider", "skynet")
    assert_error(api.post(path, body, format="json"), 400, "unknown_provider")


@pytest.mark.parametrize("path,base", ALL_POST_ENDPOINTS)
@pytest.mark.parametrize("raw", [
    pytest.param(b'{"userId": ', id="truncated"),
    pytest.param(b"{'userId': 1}", id="single-quotes"),
    pytest.param(b'{"tokens": NaN}', id="nan"),
    pytest.param(b'{"tokens": Infinity}', id="infinity"),
    pytest.param(b"\xff\xfe\x00garbage", id="not-utf8"),
    pytest.param(b"[" * 100_000 + b"]" * 100_000, id="deeply-nested"),
    pytest.param(b'{"userId": 1, "operationId": "\\ud800", "topic": "\\udfff"}', id="lone-surrogate"),
    pytest.param(b'{"operations": [{"model": "\\udfff"}], "sources": ["ok", "\\ud800x"]}', id="nested-surrogate"),
    pytest.param(b'{"userId": 1, "operationId": "\xed\xa0\x80"}', id="surrogate-as-utf8-bytes"),
    pytest.param(b'{"userId": 1, "operationId": "caf\xc3\xa9 \\ud83d"}', id="text-then-lone-surrogate"),
])
def test_malformed_json_is_400(api, user, path, base, raw):
    response = api.generic("POST", path, raw, content_type="application/json")
    assert_error(response, 400, "malformed_json")


@pytest.mark.parametrize("path,base", ALL_POST_ENDPOINTS)
@pytest.mark.parametrize("body", [[], ["x"], "x", 1, None, True], ids=["list", "list-of-str", "string", "number",
                                                                         "null", "bool"])
def test_a_body_that_is_not_an_object_is_400(api, user, path, base, body):
    response = api.generic("POST", path, json.dumps(body), content_type="application/json")
    assert_error(response, 400, "invalid_request")


@pytest.mark.parametrize("path,base", ALL_POST_ENDPOINTS)
def test_an_empty_body_names_the_missing_fields(api, user, path, base):
    response = api.generic("POST", path, b"", content_type="application/json")
    error = assert_error(response, 400, "invalid_request")
    assert error["fields"]


@pytest.mark.parametrize("path,base", ALL_POST_ENDPOINTS)
def test_form_encoded_bodies_are_415(api, user, path, base):
    response = api.post(path, {"userId": user.pk}, format="multipart")
    assert_error(response, 415, "unsupported_media_type")


@pytest.mark.parametrize("path", ["/api/tokens/consume", "/api/tokens/usage", "/api/tokens/check"])
def test_wrong_method_is_405(api, path):
    response = api.put(path, {}, format="json")
    assert_error(response, 405, "method_not_allowed")


def test_unknown_api_path_is_404_with_the_error_shape(api):
    assert_error(api.get("/api/tokens/nope"), 404, "not_found")


@pytest.mark.parametrize("field,value", [
    ("operationId", MISSING), ("operationId", ""), ("operationId", "   "), ("operationId", "x" * 201),
    ("operationId", None), ("operationId", "bad\u0000id"),
    ("operationType", MISSING), ("operationType", ""), ("operationType", None), ("operationType", ["summary"]),
    ("provider", {"slug": "openai"}), ("model", "m" * 101),
    ("reservationId", "not-a-uuid"), ("reservationId", "1234"), ("reservationId", {}),
    ("estimatedTokens", -1), ("estimatedTokens", "10"), ("estimatedTokens", True), ("estimatedTokens", 1.5),
    ("estimatedTokens", MAX + 1),
    # strings are strings (DRF would take 0 as "0"), and max_length counts the whitespace it trims
    ("operationId", 0), ("operationId", 1.5), ("operationId", True), ("operationType", 0), ("provider", 7),
    ("model", False), ("operationId", "  " + "x" * 199),
])
def test_consume_field_validation(api, user, field, value):
    response = api.post("/api/tokens/consume", with_change(consume_base(user), field, value), format="json")
    assert_error(response, 400, "invalid_request", field=field)


def test_consume_with_an_unknown_reservation_is_404(api, user):
    body = {**consume_base(user), "reservationId": str(uuid.uuid4())}
    assert_error(api.post("/api/tokens/consume", body, format="json"), 404, "reservation_not_found")


@pytest.mark.parametrize("field,value", [
    ("reserve", "maybe"), ("reserve", 2), ("reserve", None), ("ttlSeconds", 0), ("ttlSeconds", -1),
    ("ttlSeconds", "60"), ("ttlSeconds", 10**9), ("operationId", "y" * 201),
    # booleans are true or false (DRF would take "yes", "on", "true" and 1 as true)
    ("reserve", "yes"), ("reserve", "true"), ("reserve", "on"), ("reserve", 1), ("reserve", 0),
    ("operationId", 0), ("operationType", 12),
])
def test_check_field_validation(api, user, field, value):
    response = api.post("/api/tokens/check", with_change(reserve_base(user), field, value), format="json")
    assert_error(response, 400, "invalid_request", field=field)


@pytest.mark.parametrize("field,value", [
    ("operationType", MISSING), ("topic", MISSING), ("topic", None), ("topic", {"a": 1}), ("topic", ["a"]),
    ("topic", "nul\u0000"), ("sources", "not a list"), ("sources", [{"a": 1}]), ("sources", [None]),
    ("sources", ["s"] * 1001), ("sources", {"0": "s"}), ("provider", None), ("model", ["gpt-4o"]),
    ("topic", 5), ("sources", [5]), ("operationType", True), ("provider", 1),
])
def test_estimate_field_validation(api, user, field, value):
    response = api.post("/api/tokens/estimate", with_change(estimate_base(user), field, value), format="json")
    assert_error(response, 400, "invalid_request", field=field)


@pytest.mark.parametrize("value", [MISSING, None, "nope", 12.5, [], ""])
def test_release_needs_a_reservation_uuid(api, user, value):
    response = api.post("/api/tokens/release", with_change(release_base(user), "reservationId", value), format="json")
    assert_error(response, 400, "invalid_request", field="reservationId")


def test_release_of_an_unknown_reservation_is_404(api, user):
    assert_error(api.post("/api/tokens/release", release_base(user), format="json"), 404, "reservation_not_found")


@pytest.mark.parametrize("operations", [MISSING, None, [], "x", {"0": {}}, [1], [[]], ["op"]],
                         ids=["missing", "null", "empty", "string", "object", "number-item", "list-item",
                              "string-item"])
def test_batch_needs_a_list_of_operation_objects(api, user, operations):
    body = with_change({}, "operations", operations)
    assert_error(api.post("/api/tokens/consume/batch", body, format="json"), 400, "invalid_request",
                 field="operations")


def test_batch_of_more_than_1000_is_refused(api, user):
    operations = [{**consume_base(user), "operationId": f"op-{i}", "tokens": 1} for i in range(1001)]
    assert_error(api.post("/api/tokens/consume/batch", {"operations": operations}, format="json"), 400,
                 "invalid_request", field="operations")


@pytest.mark.parametrize("path", ["/api/tokens/usage", "/api/tokens/history"])
@pytest.mark.parametrize("query", ["", "?userId=", "?userId=abc", "?userId=1.5", "?userId=-3", "?userId=0",
                                   "?userId=99999999999999999999999", "?userId=true"],
                         ids=["missing", "empty", "string", "float", "negative", "zero", "huge", "bool"])
def test_read_endpoints_validate_user_id(api, path, query):
    error = assert_error(api.get(path + query), 400, "invalid_request")
    assert "userId" in error["fields"]


@pytest.mark.parametrize("path", ["/api/tokens/usage", "/api/tokens/history"])
@pytest.mark.parametrize("unknown", [UNKNOWN_USER_ID, 2**63 - 1])
def test_read_endpoints_unknown_user_is_404(api, path, unknown):
    assert_error(api.get(f"{path}?userId={unknown}"), 404, "unknown_user")


@pytest.mark.parametrize("query,field", [
    ("from=yesterday", "from"), ("from=2026-02-30", "from"), ("to=2026-13-01", "to"),
    ("from=2026-01-01T25:00:00", "from"), ("to=2026-01-01T10:00:00+99:00", "to"), ("from=", "from"),
    ("kind=refund", "kind"), ("operationType=" + "x" * 41, "operationType"),
])
def test_history_filters_are_validated(api, user, query, field):
    response = api.get(f"/api/tokens/history?userId={user.pk}&{query}")
    assert_error(response, 400, "invalid_request", field=field)


def test_history_with_a_forged_cursor_is_a_4xx(api, user):
    response = api.get(f"/api/tokens/history?userId={user.pk}&cursor=%21%21not-base64%21%21")
    assert_error(response, 404, "not_found")


@pytest.mark.parametrize("field,value,code", [("operationType", "teleportation", "unknown_operation_type"),
                                              ("provider", "skynet", "unknown_provider")])
def test_two_faults_at_once_are_still_a_4xx(api, user, field, value, code):
    """An unknown operation type (or provider) for an unknown user: refused, and audited without a
    dangling user reference."""
    body = {**consume_base(user), "userId": UNKNOWN_USER_ID, field: value}
    assert_error(api.post("/api/tokens/consume", body, format="json"), 400, code)
    error = assert_error(api.post("/api/tokens/consume/batch", {"operations": [consume_base(user), body]},
                                  format="json"), 400, code)
    assert error["index"] == 1
