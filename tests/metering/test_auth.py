"""Who may call what: service keys (scoped, revocable, bound to an environment)
and signed-in users reading their own usage."""
from __future__ import annotations

import pytest
from rest_framework.test import APIClient

from metering.models import LedgerEntry, ServiceKey
from metering.services import service_key_create, service_key_revoke

from .conftest import consume_body, key_client

pytestmark = pytest.mark.django_db


def endpoints(user) -> list[tuple[str, str, dict | None]]:
    return [
        ("post", "/api/tokens/estimate", {"userId": user.pk, "operationType": "summary", "topic": "hello"}),
        ("post", "/api/tokens/check", {"userId": user.pk, "tokens": 10}),
        ("post", "/api/tokens/consume", consume_body(user, "op-auth", 10)),
        ("post", "/api/tokens/consume/batch", {"operations": [consume_body(user, "op-auth-b", 10)]}),
        ("post", "/api/tokens/release", {"userId": user.pk, "reservationId": "1b4e28ba-2fa1-11d2-883f-0016d3cca427"}),
        ("get", f"/api/tokens/usage?userId={user.pk}", None),
        ("get", f"/api/tokens/history?userId={user.pk}", None),
    ]


def call(client, method, path, body):
    return client.post(path, body, format="json") if method == "post" else client.get(path)


def assert_refused(response, status: int, code: str):
    assert response.status_code == status, response.content
    assert response.json()["error"]["code"] == code


@pytest.mark.parametrize("header", [None, "", "Api-Key", "Api-Key ", "Bearer abc", "Token abc", "api-key x"])
def test_no_usable_credentials_is_401_everywhere(make_user, header):
    user = make_user()
    client = APIClient()
    if header is not None:
        client.credentials(HTTP_AUTHORIZATION=header)
    for method, path, body in endpoints(user):
        response = call(client, method, path, body)
        assert response.status_code == 401, (path, response.content)
        assert response.json()["error"]["code"] in ("not_authenticated", "authentication_failed")
    assert not LedgerEntry.objects.exists()


def test_a_wrong_key_is_401(make_user, service_key):
    user = make_user()
    for method, path, body in endpoints(user):
        assert_refused(call(key_client(service_key + "x"), method, path, body), 401, "authentication_failed")


def test_a_revoked_key_is_401(make_user):
    user = make_user()
    key, raw = service_key_create(name="old")
    assert key_client(raw).get(f"/api/tokens/usage?userId={user.pk}").status_code == 200
    service_key_revoke(key=key)
    for method, path, body in endpoints(user):
        assert_refused(call(key_client(raw), method, path, body), 401, "authentication_failed")


def test_a_key_from_another_environment_is_401(make_user, settings):
    user = make_user()
    _, raw = service_key_create(name="staging", environment="staging")
    assert settings.DEPLOY_ENVIRONMENT != "staging"
    for method, path, body in endpoints(user):
        assert_refused(call(key_client(raw), method, path, body), 401, "authentication_failed")
    settings.DEPLOY_ENVIRONMENT = "staging"
    assert key_client(raw).get(f"/api/tokens/usage?userId={user.pk}").status_code == 200


def test_a_read_key_reads_but_never_changes_balances(make_user, read_api):
    user = make_user()
    allowed = {"/api/tokens/estimate", "/api/tokens/check", "/api/tokens/usage", "/api/tokens/history"}
    for method, path, body in endpoints(user):
        response = call(read_api, method, path, body)
        if path.split("?")[0] in allowed:
            assert response.status_code == 200, (path, response.content)
        else:
            assert_refused(response, 403, "permission_denied")
    reserve = read_api.post("/api/tokens/check", {"userId": user.pk, "tokens": 10, "reserve": True}, format="json")
    assert_refused(reserve, 403, "permission_denied")
    assert not LedgerEntry.objects.exists()


def test_key_use_is_recorded(make_user):
    user = make_user()
    key, raw = service_key_create(name="seen")
    assert key.last_used_at is None
    key_client(raw).get(f"/api/tokens/usage?userId={user.pk}")
    key.refresh_from_db()
    assert key.last_used_at is not None


def test_keys_are_stored_hashed(db):
    key, raw = service_key_create(name="hashed", scope=ServiceKey.Scope.READ)
    stored = ServiceKey.objects.get(pk=key.pk)
    assert raw not in (stored.hashed_key, stored.prefix) and len(stored.hashed_key) == 64
    assert raw.startswith(stored.prefix)


@pytest.fixture
def signed_in(make_user):
    user = make_user("pro")
    client = APIClient()
    assert client.login(username=user.username, password="pw-for-tests-1")
    return user, client


def test_a_signed_in_user_reads_their_own_usage_and_history(signed_in, api):
    user, client = signed_in
    api.post("/api/tokens/consume", consume_body(user, "mine", 123), format="json")
    for path in ("/api/tokens/usage", f"/api/tokens/usage?userId={user.pk}"):
        response = client.get(path)
        assert response.status_code == 200 and response.json()["used"] == 123
    history = client.get("/api/tokens/history").json()
    assert [row["operationId"] for row in history["results"]] == ["mine"]
    assert client.get(f"/api/tokens/history?userId={user.pk}").status_code == 200


@pytest.mark.parametrize("path", ["/api/tokens/usage", "/api/tokens/history"])
def test_a_signed_in_user_cannot_read_someone_else(signed_in, make_user, path):
    _, client = signed_in
    other = make_user()
    assert_refused(client.get(f"{path}?userId={other.pk}"), 403, "permission_denied")


def test_a_signed_in_user_cannot_estimate_or_check_for_someone_else(signed_in, make_user):
    user, client = signed_in
    other = make_user()
    body = {"userId": other.pk, "operationType": "summary", "topic": "x"}
    assert_refused(client.post("/api/tokens/estimate", body, format="json"), 403, "permission_denied")
    assert client.post("/api/tokens/estimate", {**body, "userId": user.pk}, format="json").status_code == 200
    assert_refused(client.post("/api/tokens/check", {"userId": other.pk, "tokens": 1}, format="json"), 403,
                   "permission_denied")


def test_a_signed_in_user_cannot_spend(signed_in):
    user, client = signed_in
    for method, path, body in endpoints(user):
        if path.startswith(("/api/tokens/consume", "/api/tokens/release")):
            assert_refused(call(client, method, path, body), 403, "permission_denied")
    reserve = client.post("/api/tokens/check", {"tokens": 10, "reserve": True}, format="json")
    assert_refused(reserve, 403, "permission_denied")
    assert not LedgerEntry.objects.exists()
