"""Holds: placed by check+reserve, counted against the cap until they expire, settled by a
consume (within the cap), released, or expired (free at once; the ledger says so at the next
write to their period or the expiry job)."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone as dt_timezone

import pytest
import time_machine
from django.utils import timezone

from metering.models import AuditLog, LedgerEntry, Reservation
from metering.services import ledger_reconcile, reconcile, reservations_expire_stale, reservations_expiry_run

from .conftest import consume_body, current_period

pytestmark = pytest.mark.django_db

# Tests that step the clock past a hold's expiry start mid-month, so the steps stay in one period.
MID_MONTH = datetime(2026, 11, 10, 12, 0, tzinfo=dt_timezone.utc)


def reserve(api, user, tokens, **extra):
    response = api.post("/api/tokens/check", {"userId": user.pk, "tokens": tokens, "reserve": True, **extra},
                        format="json")
    assert response.status_code == 200, response.content
    return response.json()


def usage(api, user) -> dict:
    return api.get(f"/api/tokens/usage?userId={user.pk}").json()


def check(api, user, tokens) -> dict:
    return api.post("/api/tokens/check", {"userId": user.pk, "tokens": tokens}, format="json").json()


def release(api, user, reservation_id):
    return api.post("/api/tokens/release", {"userId": user.pk, "reservationId": reservation_id}, format="json")


@pytest.fixture
def user(make_user):
    return make_user("basic")  # limit 10,000, cap 15,000


def test_a_hold_counts_against_the_cap(api, user, spend):
    spend(user, 9_000)
    hold = reserve(api, user, 5_000, operationType="consensus")
    assert hold["sufficient"] is True
    assert (hold["available"], hold["cap"]) == (1_000, 15_000)
    assert hold["overage"] == 4_000  # 9,000 + 5,000 passes the 10,000 limit by 4,000
    expires = timezone.datetime.fromisoformat(hold["expiresAt"].replace("Z", "+00:00"))
    assert timedelta(minutes=14) < expires - timezone.now() <= timedelta(minutes=15)
    usage = api.get(f"/api/tokens/usage?userId={user.pk}").json()
    assert (usage["used"], usage["reserved"], usage["available"]) == (9_000, 5_000, 1_000)
    check = api.post("/api/tokens/check", {"userId": user.pk, "tokens": 1_001}, format="json").json()
    assert check["sufficient"] is False and check["available"] == 1_000
    refused = api.post("/api/tokens/consume", consume_body(user, "too-much", 1_001), format="json")
    assert refused.status_code == 402
    second = reserve(api, user, 1_001)
    assert second["sufficient"] is False and "reservationId" not in second
    assert api.post("/api/tokens/consume", consume_body(user, "fits", 1_000), format="json").status_code == 201
    assert ledger_reconcile() == []


def test_a_custom_ttl(api, user):
    hold = reserve(api, user, 10, ttlSeconds=60)
    reservation = Reservation.objects.get(pk=hold["reservationId"])
    assert reservation.expires_at - reservation.created_at == timedelta(seconds=60)


def test_settling_may_use_more_than_the_hold_within_the_room_under_the_cap(api, user, spend):
    spend(user, 13_000)
    hold = reserve(api, user, 1_000, operationId="run-1")  # 14,000 committed: 1,000 of room beyond the hold
    body = consume_body(user, "run-1", 1_700, "consensus", provider="anthropic", model="claude-sonnet-4",
                        reservationId=hold["reservationId"], estimatedTokens=1_000)
    response = api.post("/api/tokens/consume", body, format="json")
    assert response.status_code == 201, response.content
    usage = response.json()["usage"]
    assert (usage["used"], usage["reserved"], usage["cap"], usage["available"]) == (14_700, 0, 15_000, 300)
    assert usage["status"] == "exceeded" and usage["overage"]["tokens"] == 4_700
    reservation = Reservation.objects.get(pk=hold["reservationId"])
    assert reservation.status == "settled" and reservation.finished_at is not None
    entry = LedgerEntry.objects.get(operation_id="run-1", kind="consumption")
    assert (entry.used_delta, entry.reserved_delta, entry.reservation_id) == (1_700, -1_000, reservation.pk)
    assert (entry.estimated_tokens, entry.actual_tokens) == (1_000, 1_700)
    # a replay of the settle answers the same and charges nothing
    again = api.post("/api/tokens/consume", body, format="json")
    assert again.status_code == 200 and again.json() == response.json()
    assert current_period(user).used == 14_700
    assert ledger_reconcile() == [] and not reconcile()


@pytest.mark.parametrize("then", ["settle-within-the-cap", "release"])
def test_settling_past_the_cap_is_refused_records_nothing_and_keeps_the_hold(api, user, spend, then):
    spend(user, 14_000)
    hold = reserve(api, user, 1_000, operationId="run-2")  # the cap is reached: nothing beyond the hold
    ledger_rows = LedgerEntry.objects.count()
    body = consume_body(user, "run-2", 1_700, "consensus", reservationId=hold["reservationId"])
    refused = api.post("/api/tokens/consume", body, format="json", HTTP_X_REQUEST_ID="settle-402")
    assert refused.status_code == 402, refused.content
    error = refused.json()["error"]
    assert (error["code"], error["available"], error["cap"]) == ("token_cap_exceeded", 1_000, 15_000)
    # nothing recorded: no ledger row, the counters as they were, the hold still held
    assert LedgerEntry.objects.count() == ledger_rows
    period = current_period(user)
    assert (period.used, period.reserved) == (14_000, 1_000)
    assert Reservation.objects.get(pk=hold["reservationId"]).status == "held"
    row = AuditLog.objects.get(request_id="settle-402")
    assert (row.action, row.result, row.tokens, row.operation_id) == ("consume", "token_cap_exceeded", 1_700, "run-2")
    if then == "release":
        assert release(api, user, hold["reservationId"]).json()["status"] == "released"
        period = current_period(user)
        assert (period.used, period.reserved) == (14_000, 0)
    else:
        settled = api.post("/api/tokens/consume", {**body, "tokens": 1_000}, format="json")
        assert settled.status_code == 201, settled.content
        assert (settled.json()["usage"]["used"], settled.json()["usage"]["reserved"]) == (15_000, 0)
        assert Reservation.objects.get(pk=hold["reservationId"]).status == "settled"
    assert ledger_reconcile() == [] and not reconcile()


def test_a_one_token_hold_settled_with_a_million_tokens_is_refused(api, user):
    hold = reserve(api, user, 1)
    response = api.post("/api/tokens/consume", consume_body(user, "huge", 1_000_000,
                                                            reservationId=hold["reservationId"]), format="json")
    assert response.status_code == 402
    error = response.json()["error"]
    # what this settlement could record: the whole cap, its own hold included
    assert (error["code"], error["available"], error["cap"]) == ("token_cap_exceeded", 15_000, 15_000)
    period = current_period(user)
    assert (period.used, period.reserved) == (0, 1)
    assert not LedgerEntry.objects.filter(kind="consumption").exists()
    assert Reservation.objects.get(pk=hold["reservationId"]).status == "held"
    assert ledger_reconcile() == [] and not reconcile()


def test_settling_below_the_hold_frees_the_difference(api, user):
    hold = reserve(api, user, 2_000)
    api.post("/api/tokens/consume", consume_body(user, "small", 300, reservationId=hold["reservationId"]),
             format="json")
    period = current_period(user)
    assert (period.used, period.reserved) == (300, 0)


def test_release_frees_the_hold_and_is_idempotent(api, user):
    hold = reserve(api, user, 700, operationId="to-release")
    first = release(api, user, hold["reservationId"])
    assert first.status_code == 200
    assert first.json() == {"reservationId": hold["reservationId"], "status": "released", "tokens": 700}
    assert current_period(user).reserved == 0
    second = release(api, user, hold["reservationId"])
    assert second.status_code == 200 and second.json() == first.json()
    assert LedgerEntry.objects.filter(kind="release", reservation_id=hold["reservationId"]).count() == 1
    assert current_period(user).reserved == 0
    assert ledger_reconcile() == []


def test_a_released_hold_cannot_be_settled(api, user):
    hold = reserve(api, user, 700)
    release(api, user, hold["reservationId"])
    response = api.post("/api/tokens/consume", consume_body(user, "late", 10, reservationId=hold["reservationId"]),
                        format="json")
    assert response.status_code == 409
    assert response.json()["error"]["code"] == "reservation_expired"
    assert current_period(user).used == 0


def test_releasing_a_settled_hold_is_409(api, user):
    hold = reserve(api, user, 500)
    api.post("/api/tokens/consume", consume_body(user, "done", 400, reservationId=hold["reservationId"]),
             format="json")
    response = release(api, user, hold["reservationId"])
    assert response.status_code == 409
    assert response.json()["error"]["code"] == "reservation_settled"
    assert "settled" in response.json()["error"]["message"]
    period = current_period(user)
    assert (period.used, period.reserved) == (400, 0)
    assert ledger_reconcile() == []


def test_someone_elses_reservation_is_not_found(api, user, make_user):
    other = make_user()
    hold = reserve(api, other, 100)
    response = release(api, user, hold["reservationId"])
    assert response.status_code == 404 and response.json()["error"]["code"] == "reservation_not_found"
    settle = api.post("/api/tokens/consume", consume_body(user, "x", 1, reservationId=hold["reservationId"]),
                      format="json")
    assert settle.status_code == 404 and settle.json()["error"]["code"] == "reservation_not_found"
    assert current_period(other).reserved == 100


def test_reserving_twice_with_one_operation_id_returns_the_same_hold(api, user):
    first = reserve(api, user, 800, operationId="op-once")
    second = reserve(api, user, 800, operationId="op-once")
    assert second["reservationId"] == first["reservationId"]
    assert second["sufficient"] is True
    assert current_period(user).reserved == 800
    assert Reservation.objects.filter(operation_id="op-once").count() == 1


def test_holds_without_operation_id_are_independent(api, user):
    a, b = reserve(api, user, 100), reserve(api, user, 100)
    assert a["reservationId"] != b["reservationId"]
    assert current_period(user).reserved == 200


@time_machine.travel(MID_MONTH)
def test_stale_holds_expire_and_cannot_be_settled(api, user):
    start = timezone.now()
    stale = reserve(api, user, 900, operationId="stale")
    fresh = reserve(api, user, 100, operationId="fresh", ttlSeconds=3600)
    assert reservations_expire_stale() == 0  # nothing is stale yet
    with time_machine.travel(start + timedelta(minutes=16), tick=False):
        assert reservations_expire_stale() == 1
        assert reservations_expire_stale() == 0  # safe to run twice
        assert Reservation.objects.get(pk=stale["reservationId"]).status == "expired"
        assert Reservation.objects.get(pk=fresh["reservationId"]).status == "held"
        assert current_period(user).reserved == 100
        settle = api.post("/api/tokens/consume",
                          consume_body(user, "stale", 950, reservationId=stale["reservationId"]), format="json")
        assert settle.status_code == 409
        assert settle.json()["error"]["code"] == "reservation_expired"
        released = release(api, user, stale["reservationId"])
        assert released.status_code == 409 and released.json()["error"]["code"] == "reservation_expired"
        # the operation can still be recorded, without the hold, under the cap
        assert api.post("/api/tokens/consume", consume_body(user, "stale", 950), format="json").status_code == 201
    assert current_period(user).used == 950
    assert LedgerEntry.objects.get(kind="release", reservation_id=stale["reservationId"]).reason == "expired"
    assert ledger_reconcile() == []


@time_machine.travel(MID_MONTH)
def test_a_hold_past_its_expiry_cannot_be_settled_even_before_it_is_released(api, user):
    start = timezone.now()
    hold = reserve(api, user, 600, ttlSeconds=60)
    body = consume_body(user, "slow-op", 650, reservationId=hold["reservationId"])
    with time_machine.travel(start + timedelta(seconds=61), tick=False):
        settle = api.post("/api/tokens/consume", body, format="json")
        assert settle.status_code == 409
        assert settle.json()["error"]["code"] == "reservation_expired"
        assert settle.json()["error"]["status"] == "expired"
        assert current_period(user).reserved == 600  # the counter, until the expiry is written...
        assert usage(api, user)["reserved"] == 0  # ...but its tokens are free already
        assert reservations_expire_stale() == 1
        assert current_period(user).reserved == 0
    with time_machine.travel(start + timedelta(seconds=59), tick=False):
        fresh = reserve(api, user, 100, ttlSeconds=60)
        settled = api.post("/api/tokens/consume", consume_body(user, "quick-op", 90,
                                                               reservationId=fresh["reservationId"]), format="json")
        assert settled.status_code == 201
    assert ledger_reconcile() == []


@pytest.fixture(params=[True, False], ids=["fast", "orm"])
def either_path(request, settings):
    settings.METERING_FAST_PATH = request.param


@time_machine.travel(MID_MONTH)
def test_an_expired_holds_tokens_are_available_the_moment_it_expires(api, user, spend, either_path):
    spend(user, 14_000)
    hold = reserve(api, user, 1_000, operationId="short", ttlSeconds=1)
    expires = datetime.fromisoformat(hold["expiresAt"].replace("Z", "+00:00"))
    with time_machine.travel(expires - timedelta(milliseconds=1), tick=False):
        assert (usage(api, user)["reserved"], usage(api, user)["available"]) == (1_000, 0)
        assert check(api, user, 1_000)["sufficient"] is False
    with time_machine.travel(expires, tick=False):
        # the reads: free at once, though nothing has written the expiry yet
        now = usage(api, user)
        assert (now["used"], now["reserved"], now["available"]) == (14_000, 0, 1_000)
        assert check(api, user, 1_000) == {"sufficient": True, "available": 1_000, "overage": 1_000, "cap": 15_000}
        assert Reservation.objects.get(pk=hold["reservationId"]).status == "held"
        # a consume that needs those tokens succeeds: its transaction writes the expiry first
        consumed = api.post("/api/tokens/consume", consume_body(user, "needs-them", 1_000), format="json")
        assert consumed.status_code == 201, consumed.content
        assert (consumed.json()["usage"]["used"], consumed.json()["usage"]["reserved"]) == (15_000, 0)
        assert Reservation.objects.get(pk=hold["reservationId"]).status == "expired"
        # the frequent job finds nothing left to write
        assert reservations_expiry_run() == 0
    release_row = LedgerEntry.objects.get(kind="release", reservation_id=hold["reservationId"])
    assert (release_row.reserved_delta, release_row.reason) == (-1_000, "expired")
    assert AuditLog.objects.filter(action="release", result="expired", detail__reservationId=hold["reservationId"]
                                   ).count() == 1
    assert ledger_reconcile() == [] and not reconcile()


@time_machine.travel(MID_MONTH)
def test_a_reserve_and_a_batch_reuse_an_expired_holds_tokens(api, user, spend):
    spend(user, 14_000)
    first = reserve(api, user, 1_000, operationId="again", ttlSeconds=1)
    expires = datetime.fromisoformat(first["expiresAt"].replace("Z", "+00:00"))
    with time_machine.travel(expires + timedelta(milliseconds=500), tick=False):
        # the same operation id reserves anew: not the expired hold back, a new one in its place
        second = reserve(api, user, 1_000, operationId="again", ttlSeconds=1)
        assert second["sufficient"] is True and second["reservationId"] != first["reservationId"]
        assert Reservation.objects.get(pk=first["reservationId"]).status == "expired"
    with time_machine.travel(expires + timedelta(seconds=2), tick=False):
        batch = api.post("/api/tokens/consume/batch", {"operations": [consume_body(user, "b-1", 600),
                                                                      consume_body(user, "b-2", 400)]}, format="json")
        assert batch.status_code == 201, batch.content
        assert Reservation.objects.get(pk=second["reservationId"]).status == "expired"
        assert reservations_expiry_run() == 0
    period = current_period(user)
    assert (period.used, period.reserved) == (15_000, 0)
    assert LedgerEntry.objects.filter(kind="release", reason="expired").count() == 2
    assert ledger_reconcile() == [] and not reconcile()
