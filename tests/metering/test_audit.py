"""Every token operation leaves an audit row - who, what, from where, with which
key and request id, and what we answered - refused ones included."""
from __future__ import annotations

from datetime import timedelta

import pytest
import time_machine
from django.utils import timezone

from metering.models import AuditLog, ServiceKey
from metering.services import reservations_expire_stale

from .conftest import consume_body

pytestmark = pytest.mark.django_db

HEADERS = {"HTTP_USER_AGENT": "consensus-worker/2.1 (+tests)", "REMOTE_ADDR": "10.1.2.3"}


@pytest.fixture
def user(make_user):
    return make_user("basic")


@pytest.fixture
def key(service_key):
    return ServiceKey.objects.get(name="tests")


def post(api, path, body, request_id):
    return api.post(path, body, format="json", HTTP_X_REQUEST_ID=request_id, **HEADERS)


def audit_for(request_id: str) -> AuditLog:
    return AuditLog.objects.get(request_id=request_id)


def assert_request_facts(row: AuditLog, user, key, request_id: str) -> None:
    assert row.user_id == user.pk
    assert row.client_ip == "10.1.2.3"
    assert row.user_agent == "consensus-worker/2.1 (+tests)"
    assert row.service_key_id == key.pk
    assert row.request_id == request_id
    assert abs(row.created_at - timezone.now()) < timedelta(minutes=1)


@pytest.mark.parametrize("fast_path", [True, False], ids=["fast", "orm"])
def test_consume_outcomes_are_audited(api, user, key, settings, spend, fast_path):
    settings.METERING_FAST_PATH = fast_path
    body = consume_body(user, "op-a", 250, "analysis")
    response = post(api, "/api/tokens/consume", body, "req-recorded")
    assert response["X-Request-ID"] == "req-recorded"
    row = audit_for("req-recorded")
    assert_request_facts(row, user, key, "req-recorded")
    assert (row.action, row.result, row.tokens, row.operation_type, row.operation_id) == (
        "consume", "recorded", 250, "analysis", "op-a")

    post(api, "/api/tokens/consume", body, "req-replayed")
    assert (audit_for("req-replayed").result, audit_for("req-replayed").tokens) == ("replayed", 250)

    post(api, "/api/tokens/consume", {**body, "tokens": 251}, "req-conflict")
    row = audit_for("req-conflict")
    assert_request_facts(row, user, key, "req-conflict")
    assert (row.result, row.tokens, row.operation_id) == ("operation_id_conflict", 251, "op-a")

    spend(user, 14_700)
    assert post(api, "/api/tokens/consume", consume_body(user, "op-b", 51), "req-cap").status_code == 402
    row = audit_for("req-cap")
    assert_request_facts(row, user, key, "req-cap")
    assert (row.action, row.result, row.tokens) == ("consume", "token_cap_exceeded", 51)

    post(api, "/api/tokens/consume", consume_body(user, "op-c", 1, "bogus"), "req-bad-op")
    assert audit_for("req-bad-op").result == "unknown_operation_type"


def test_check_reserve_settle_release_and_expiry_are_audited(api, user, key):
    post(api, "/api/tokens/check", {"userId": user.pk, "tokens": 20_000}, "req-check")
    row = audit_for("req-check")
    assert_request_facts(row, user, key, "req-check")
    assert (row.action, row.result, row.tokens) == ("check", "insufficient", 20_000)

    hold = post(api, "/api/tokens/check", {"userId": user.pk, "tokens": 300, "reserve": True,
                                           "operationId": "h-1", "operationType": "summary"}, "req-reserve").json()
    row = audit_for("req-reserve")
    assert_request_facts(row, user, key, "req-reserve")
    assert (row.action, row.result, row.tokens, row.detail["reservationId"]) == (
        "reserve", "reserved", 300, hold["reservationId"])

    post(api, "/api/tokens/check", {"userId": user.pk, "tokens": 15_000, "reserve": True}, "req-reserve-no")
    assert (audit_for("req-reserve-no").action, audit_for("req-reserve-no").result) == ("reserve", "insufficient")

    post(api, "/api/tokens/check", {"userId": user.pk, "tokens": 5, "reserve": True, "operationType": "nope"},
         "req-reserve-bad")
    row = audit_for("req-reserve-bad")
    assert_request_facts(row, user, key, "req-reserve-bad")
    assert (row.action, row.result, row.tokens, row.operation_type) == ("reserve", "unknown_operation_type", 5, "nope")

    post(api, "/api/tokens/release", {"userId": user.pk, "reservationId": hold["reservationId"]}, "req-release")
    row = audit_for("req-release")
    assert_request_facts(row, user, key, "req-release")
    assert (row.action, row.result, row.tokens) == ("release", "released", 300)

    post(api, "/api/tokens/release", {"userId": user.pk, "reservationId": "1b4e28ba-2fa1-11d2-883f-0016d3cca427"},
         "req-release-404")
    assert (audit_for("req-release-404").action, audit_for("req-release-404").result) == (
        "release", "reservation_not_found")

    settled = post(api, "/api/tokens/check", {"userId": user.pk, "tokens": 100, "reserve": True}, "r2").json()
    post(api, "/api/tokens/consume", consume_body(user, "s-1", 90, reservationId=settled["reservationId"]),
         "req-settle")
    assert (audit_for("req-settle").result, audit_for("req-settle").tokens) == ("recorded", 90)
    post(api, "/api/tokens/release", {"userId": user.pk, "reservationId": settled["reservationId"]}, "req-rel-409")
    assert audit_for("req-rel-409").result == "reservation_settled"

    stale = post(api, "/api/tokens/check", {"userId": user.pk, "tokens": 40, "reserve": True}, "r3").json()
    with time_machine.travel(timezone.now() + timedelta(hours=1)):
        reservations_expire_stale()
    row = AuditLog.objects.get(action="release", result="expired")
    assert (row.user_id, row.tokens, row.actor, row.detail["reservationId"]) == (
        user.pk, 40, "cleanup", stale["reservationId"])


def test_estimate_and_batch_are_audited(api, user, key):
    post(api, "/api/tokens/estimate", {"userId": user.pk, "operationType": "summary", "topic": "hi"}, "req-est")
    row = audit_for("req-est")
    assert_request_facts(row, user, key, "req-est")
    assert (row.action, row.result, row.operation_type) == ("estimate", "estimated", "summary") and row.tokens > 100

    ops = [consume_body(user, f"b-{i}", 10) for i in range(3)]
    post(api, "/api/tokens/consume/batch", {"operations": ops}, "req-batch")
    rows = AuditLog.objects.filter(request_id="req-batch").order_by("operation_id")
    assert [(r.operation_id, r.result, r.tokens) for r in rows] == [(f"b-{i}", "recorded", 10) for i in range(3)]
    for r in rows:
        assert_request_facts(r, user, key, "req-batch")
    post(api, "/api/tokens/consume/batch", {"operations": ops}, "req-batch-again")
    assert list(AuditLog.objects.filter(request_id="req-batch-again").values_list("result", flat=True)) == [
        "replayed"] * 3


@pytest.mark.parametrize("sent", ["", "has spaces", "x" * 65, "semi;colon", "ünïcode"])
def test_an_unusable_request_id_is_replaced_and_still_returned(api, user, sent):
    response = api.get(f"/api/tokens/usage?userId={user.pk}", HTTP_X_REQUEST_ID=sent)
    generated = response["X-Request-ID"]
    assert generated != sent and len(generated) == 32
    post_response = api.post("/api/tokens/consume", consume_body(user, "op", 1), format="json",
                             HTTP_X_REQUEST_ID=sent)
    assert AuditLog.objects.get(operation_id="op").request_id == post_response["X-Request-ID"] != sent


def test_every_response_carries_a_request_id(api, user):
    ids = {api.get(f"/api/tokens/usage?userId={user.pk}")["X-Request-ID"] for _ in range(3)}
    assert len(ids) == 3
    assert api.get("/api/tokens/usage")["X-Request-ID"]  # errors too
