"""Security: service keys, every page and endpoint tried with another user's ids, the
audit log read-only in admin and covering admin changes, CSRF on forms, and the
production settings passing `check --deploy` with no warnings."""
from __future__ import annotations

import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest
from django.test import Client
from django.utils import timezone
from rest_framework.test import APIClient

from metering.models import AuditLog, LedgerEntry, OperationType, ServiceKey
from metering.services import ConsumeRequest, SYSTEM, account_for_user, period_current, service_key_create, \
    service_key_revoke, usage_consume
from metering.services.keys import hash_key

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.django_db, pytest.mark.within_one_period]


def key_client(raw: str) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Api-Key {raw}")
    return client


def spend(user, op: str, tokens: int = 100) -> None:
    usage_consume(request=ConsumeRequest(user_id=user.pk, operation_id=op, tokens=tokens, operation_type="summary"),
                  ctx=SYSTEM)


# --- service keys ----------------------------------------------------------------------------------

def test_keys_are_random_stored_hashed_and_shown_once():
    first, raw_first = service_key_create(name="a")
    second, raw_second = service_key_create(name="b")
    assert raw_first != raw_second and len(raw_first) >= 40
    stored = ServiceKey.objects.get(pk=first.pk)
    assert stored.hashed_key == hash_key(raw_first) and len(stored.hashed_key) == 64
    values = [str(v) for v in ServiceKey.objects.values_list(*[f.attname for f in ServiceKey._meta.fields]).get(
        pk=first.pk)]
    assert not any(raw_first in v for v in values)  # the raw key is nowhere in the row
    assert raw_first.startswith(stored.prefix) and len(stored.prefix) < len(raw_first) // 2


def test_scopes_revocation_environment_and_last_used(make_user, settings):
    user = make_user("basic")
    _, reader = service_key_create(name="reader", scope=ServiceKey.Scope.READ)
    consume = {"userId": user.pk, "operationId": "s-1", "tokens": 10, "operationType": "summary"}
    assert key_client(reader).get(f"/api/tokens/usage?userId={user.pk}").status_code == 200
    assert key_client(reader).post("/api/tokens/consume", consume, format="json").status_code == 403
    assert key_client(reader).post("/api/tokens/check", {"userId": user.pk, "tokens": 5, "reserve": True},
                                   format="json").status_code == 403
    assert key_client(reader).post("/api/tokens/release", {"userId": user.pk, "reservationId": str(
        __import__("uuid").uuid4())}, format="json").status_code == 403
    assert key_client(reader).post("/api/tokens/consume/batch", {"operations": [consume]},
                                   format="json").status_code == 403
    assert not LedgerEntry.objects.filter(account__user=user).exists()

    key, raw = service_key_create(name="writer")
    assert ServiceKey.objects.get(pk=key.pk).last_used_at is None
    assert key_client(raw).post("/api/tokens/consume", consume, format="json").status_code == 201
    last_used = ServiceKey.objects.get(pk=key.pk).last_used_at
    assert last_used is not None and (timezone.now() - last_used).total_seconds() < 60

    service_key_revoke(key=ServiceKey.objects.get(pk=key.pk))
    revoked = key_client(raw).get(f"/api/tokens/usage?userId={user.pk}")
    assert revoked.status_code == 401 and revoked.json()["error"]["code"] == "authentication_failed"

    _, staging = service_key_create(name="staging", environment="staging")
    other_env = key_client(staging).get(f"/api/tokens/usage?userId={user.pk}")
    assert other_env.status_code == 401 and "environment" in other_env.json()["error"]["message"]


# --- a user sees and changes only their own data ---------------------------------------------------

@pytest.fixture
def alice_and_bob(make_user):
    alice, bob = make_user("basic", username="alice"), make_user("pro", username="bob")
    spend(alice, "alice-op", 111)
    spend(bob, "bob-secret-op", 4321)
    client = Client()
    client.force_login(alice)
    return alice, bob, client


@pytest.mark.parametrize("path", [
    "/api/tokens/usage?userId={bob}",
    "/api/tokens/history?userId={bob}",
    "/api/tokens/analytics/daily?userId={bob}",
    "/api/tokens/reports/monthly?userId={bob}",
])
def test_a_signed_in_user_cannot_read_another_users_data(alice_and_bob, path):
    alice, bob, client = alice_and_bob
    response = client.get(path.format(bob=bob.pk))
    assert response.status_code == 403, response.content
    assert response.json()["error"]["code"] == "permission_denied"
    assert "4321" not in response.content.decode() and "bob-secret-op" not in response.content.decode()
    own = client.get(path.format(bob=alice.pk))
    assert own.status_code == 200


@pytest.mark.parametrize("path,body", [
    ("/api/tokens/estimate", {"userId": "{bob}", "operationType": "summary", "topic": "x"}),
    ("/api/tokens/check", {"userId": "{bob}", "tokens": 5}),
])
def test_a_signed_in_user_cannot_act_for_another_user(alice_and_bob, path, body):
    alice, bob, client = alice_and_bob
    body = {k: (bob.pk if v == "{bob}" else v) for k, v in body.items()}
    response = client.post(path, body, content_type="application/json")
    assert response.status_code == 403 and response.json()["error"]["code"] == "permission_denied"
    assert not AuditLog.objects.filter(user=bob, action__in=["estimate", "check"]).exists()


@pytest.mark.parametrize("path", ["/api/tokens/consume", "/api/tokens/consume/batch", "/api/tokens/release"])
def test_a_signed_in_user_cannot_change_balances(alice_and_bob, path):
    alice, bob, client = alice_and_bob
    body = {"userId": bob.pk, "operationId": "x", "tokens": 5, "operationType": "summary",
            "operations": [{"userId": bob.pk, "operationId": "x", "tokens": 5, "operationType": "summary"}],
            "reservationId": "00000000-0000-0000-0000-000000000000"}
    response = client.post(path, body, content_type="application/json")
    assert response.status_code == 403
    assert LedgerEntry.objects.filter(account__user=bob).count() == 1


def test_dashboard_pages_show_only_the_users_own_data(alice_and_bob):
    alice, bob, client = alice_and_bob
    bob_period = period_current(account=account_for_user(user_id=bob.pk))
    for path in ("/dashboard/", f"/dashboard/?period={bob_period.pk}", "/dashboard/export.csv",
                 f"/dashboard/export.csv?period={bob_period.pk}"):
        response = client.get(path)
        assert response.status_code == 200, path
        text = b"".join(response.streaming_content).decode() if response.streaming else response.content.decode()
        assert "bob-secret-op" not in text and "4,321" not in text and "4321" not in text, path
    assert "alice-op" in b"".join(client.get("/dashboard/export.csv").streaming_content).decode()


def test_pages_need_a_sign_in():
    assert Client().get("/dashboard/").status_code == 302
    assert Client().get("/api/tokens/usage").status_code in (401, 403)


# --- admin: audit log read-only, admin changes audited ---------------------------------------------

@pytest.fixture
def staff_client(django_user_model):
    staff = django_user_model.objects.create_superuser("root", "root@example.com", "pw-root-123")
    client = Client()
    client.force_login(staff)
    return client


def test_the_audit_log_cannot_be_edited_from_admin(staff_client, make_user):
    row = AuditLog.objects.create(user=make_user(), action="consume", result="recorded", tokens=5,
                                  created_at=timezone.now())
    url = f"/admin/metering/auditlog/{row.pk}/"
    assert staff_client.get(url + "change/").status_code == 200  # viewable
    assert staff_client.post(url + "change/", {"action": "x", "result": "y"}).status_code == 403
    assert staff_client.post(url + "delete/", {"post": "yes"}).status_code == 403
    assert staff_client.get("/admin/metering/auditlog/add/").status_code == 403
    staff_client.post("/admin/metering/auditlog/", {"action": "delete_selected", "_selected_action": [row.pk],
                                                    "post": "yes"})
    row.refresh_from_db()
    assert (row.action, row.result, row.tokens) == ("consume", "recorded", 5)


def test_admin_changes_land_in_the_audit_log(staff_client):
    op = OperationType.objects.get(slug="summary")
    response = staff_client.post(f"/admin/metering/operationtype/{op.pk}/change/",
                                 {"slug": "summary", "name": "Summary", "base_tokens": 150, "active": "on"},
                                 HTTP_X_REQUEST_ID="admin-req-1")
    assert response.status_code == 302, response.content[:500]
    row = AuditLog.objects.get(action="admin_change")
    assert row.actor == "root" and row.request_id == "admin-req-1"
    assert row.detail["model"] == "metering.operationtype" and row.detail["objectId"] == str(op.pk)
    assert "Base tokens" in row.detail["change"] or "base_tokens" in row.detail["change"].lower()


def test_forms_need_a_csrf_token(make_user):
    make_user(username="carol")
    client = Client(enforce_csrf_checks=True)
    assert client.post("/accounts/login/", {"username": "carol", "password": "pw-for-tests-1"}).status_code == 403
    page = client.get("/accounts/login/")
    assert b"csrfmiddlewaretoken" in page.content


# --- production settings ---------------------------------------------------------------------------

def _production(*args: str, drop: tuple[str, ...] = (), **extra: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DJANGO_", "DEBUG"))}
    env.update({"DJANGO_SETTINGS_MODULE": "consensus_tokens.settings.production",
                "SECRET_KEY": secrets.token_urlsafe(50), "ALLOWED_HOSTS": "tokens.example.com",
                "DATABASE_URL": "postgres://postgres@127.0.0.1:5432/postgres", "REDIS_URL": "redis://127.0.0.1:6379/7",
                "STRIPE_SECRET_KEY": "sk_test_from_environment", "METRICS_TOKEN": secrets.token_urlsafe(20), **extra})
    for name in drop:
        env.pop(name, None)
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def test_check_deploy_passes_with_no_warnings():
    result = _production("manage.py", "check", "--deploy", "--fail-level", "WARNING")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "System check identified no issues (0 silenced)." in result.stdout


def test_production_takes_secrets_only_from_the_environment_and_never_debugs():
    for missing in ("SECRET_KEY", "STRIPE_SECRET_KEY", "ALLOWED_HOSTS", "REDIS_URL"):
        result = _production("manage.py", "check", drop=(missing,))
        assert result.returncode != 0 and missing in result.stderr, missing
    shown = _production("-c", "import django; django.setup(); from django.conf import settings as s; "
                              "print(s.DEBUG, s.SESSION_COOKIE_SECURE, s.CSRF_COOKIE_SECURE, s.SECURE_HSTS_SECONDS, "
                              "s.SECURE_SSL_REDIRECT, s.STRIPE_SECRET_KEY, s.LOGGING['handlers']['console']['formatter'])",
                        DEBUG="true")
    assert shown.stdout.split() == ["False", "True", "True", "31536000", "True", "sk_test_from_environment", "json"]
