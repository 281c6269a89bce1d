"""POST /api/tokens/consume/batch: all or nothing, idempotent per item, and a
constant number of queries whatever the batch size."""
from __future__ import annotations

import json
from datetime import UTC, datetime
from decimal import Decimal

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from metering.models import AuditLog, LedgerEntry, Reservation, UsagePeriod
from metering.services import Usage, ledger_reconcile
from metering.services.consume.contract import PeriodFigures, format_usd
from metering.signals import usage_recorded, usage_recorded_many

from .conftest import consume_body, current_period

pytestmark = pytest.mark.django_db

BATCH = "/api/tokens/consume/batch"


def snapshot() -> tuple:
    """The ledger and every non-empty counter (an empty period may be opened on the way)."""
    return (LedgerEntry.objects.count(),
            sorted(UsagePeriod.objects.exclude(used=0, reserved=0).values_list("pk", "used", "reserved")),
            AuditLog.objects.filter(result="recorded").count())


@pytest.fixture
def users(make_user):
    return [make_user("basic"), make_user("pro"), make_user("enterprise")]


def items_for(users, count: int, prefix: str = "b") -> list[dict]:
    return [consume_body(users[i % len(users)], f"{prefix}-{i}", 10 + i % 7,
                         ("summary", "analysis", "consensus", "comparison")[i % 4], provider="openai",
                         model="gpt-4o", estimatedTokens=12) for i in range(count)]


def test_a_batch_records_every_item_with_running_usage(api, users):
    ops = items_for(users, 9)
    response = api.post(BATCH, {"operations": ops}, format="json")
    assert response.status_code == 201, response.content
    body = response.json()
    assert (body["recorded"], body["replayed"]) == (9, 0)
    assert [r["index"] for r in body["results"]] == list(range(9))
    assert all(r["result"] == "recorded" for r in body["results"])
    for user in users:
        mine = [(op, r) for op, r in zip(ops, body["results"]) if op["userId"] == user.pk]
        running = 0
        for op, result in mine:  # each answer shows the usage right after that item
            running += op["tokens"]
            assert result["userId"] == user.pk and result["operationId"] == op["operationId"]
            assert result["usage"]["used"] == running
        assert current_period(user).used == running
    entry = LedgerEntry.objects.get(operation_id="b-0")
    assert (entry.provider, entry.model, entry.estimated_tokens, entry.actual_tokens) == ("openai", "gpt-4o", 12, 10)
    assert ledger_reconcile() == []


def test_replaying_a_batch_answers_the_same_and_changes_nothing(api, users):
    ops = items_for(users, 6)
    first = api.post(BATCH, {"operations": ops}, format="json").json()
    before = snapshot()
    again = api.post(BATCH, {"operations": ops}, format="json")
    assert again.status_code == 200
    body = again.json()
    assert (body["recorded"], body["replayed"]) == (0, 6)
    assert all(r["result"] == "replayed" for r in body["results"])
    strip = lambda results: [{k: v for k, v in r.items() if k != "result"} for r in results]  # noqa: E731
    assert strip(body["results"]) == strip(first["results"])
    assert snapshot() == before


def test_a_batch_mixing_replays_and_new_items(api, users):
    single = consume_body(users[0], "solo", 77)
    solo = api.post("/api/tokens/consume", single, format="json").json()
    ops = [consume_body(users[0], "new-1", 5), single, consume_body(users[0], "new-2", 6)]
    response = api.post(BATCH, {"operations": ops}, format="json")
    assert response.status_code == 201
    results = response.json()["results"]
    assert [r["result"] for r in results] == ["recorded", "replayed", "recorded"]
    assert {k: v for k, v in results[1].items() if k not in ("index", "result", "userId")} == solo
    assert [r["usage"]["used"] for r in (results[0], results[2])] == [82, 88]
    assert current_period(users[0]).used == 88


@pytest.fixture
def recorded_elsewhere(api, users):
    api.post("/api/tokens/consume", consume_body(users[1], "taken", 50), format="json")


INVALID_ITEMS = [
    pytest.param(lambda u: {**consume_body(u, "x", 1), "tokens": "1"}, 400, "invalid_request", id="bad-type"),
    pytest.param(lambda u: {**consume_body(u, "x", 1), "tokens": 0}, 400, "invalid_request", id="zero-tokens"),
    pytest.param(lambda u: {**consume_body(u, "x", 1), "userId": 9_000_000_000}, 404, "unknown_user",
                 id="unknown-user"),
    pytest.param(lambda u: consume_body(u, "x", 1, "juggling"), 400, "unknown_operation_type", id="unknown-op-type"),
    pytest.param(lambda u: consume_body(u, "x", 1, provider="nobody"), 400, "unknown_provider",
                 id="unknown-provider"),
    pytest.param(lambda u: consume_body(u, "x", 15_001), 402, "token_cap_exceeded", id="passes-cap"),
    pytest.param(lambda u: consume_body(u, "b-1", 1), 400, "duplicate_operation", id="repeated-in-batch"),
    pytest.param(lambda u: {**consume_body(u, "x", 1), "reservationId": "1b4e28ba-2fa1-11d2-883f-0016d3cca427"},
                 404, "reservation_not_found", id="unknown-reservation"),
    pytest.param(lambda u: {**consume_body(u, "x", 1), "reservationId": "not-a-uuid"}, 400, "invalid_request",
                 id="reservation-not-a-uuid"),
]


@pytest.mark.parametrize("bad_item,status,code", INVALID_ITEMS)
def test_one_invalid_item_changes_nothing_and_is_named(api, users, bad_item, status, code):
    ops = items_for(users[:1], 5)
    ops.insert(3, bad_item(users[0]))
    before = snapshot()
    response = api.post(BATCH, {"operations": ops}, format="json")
    assert response.status_code == status, response.content
    error = response.json()["error"]
    assert error["code"] == code
    assert error["index"] == 3
    assert "3" in error["message"]
    assert snapshot() == before


def test_an_item_reusing_a_recorded_operation_id_with_another_body_refuses_the_batch(api, users,
                                                                                    recorded_elsewhere):
    ops = [*items_for(users, 4), consume_body(users[1], "taken", 51)]
    before = snapshot()
    response = api.post(BATCH, {"operations": ops}, format="json")
    assert response.status_code == 409
    assert response.json()["error"]["code"] == "operation_id_conflict"
    assert response.json()["error"]["index"] == 4
    assert snapshot() == before


def test_the_item_that_would_pass_the_cap_is_the_one_named(api, users, spend):
    user = users[0]  # basic: cap 15,000
    spend(user, 14_000)
    ops = [consume_body(user, "a", 400), consume_body(users[1], "other", 5), consume_body(user, "b", 500),
           consume_body(user, "c", 200), consume_body(user, "d", 1)]
    before = snapshot()
    response = api.post(BATCH, {"operations": ops}, format="json")
    assert response.status_code == 402
    assert response.json()["error"]["index"] == 3  # 14,000 + 400 + 500 fits; + 200 does not
    assert snapshot() == before
    ops[3]["tokens"] = 99  # now exactly the cap, with item 4
    assert api.post(BATCH, {"operations": ops}, format="json").status_code == 201
    assert current_period(user).used == 15_000


def test_reserved_tokens_count_against_the_cap_in_a_batch(api, users):
    user = users[0]
    api.post("/api/tokens/check", {"userId": user.pk, "tokens": 14_990, "reserve": True}, format="json")
    response = api.post(BATCH, {"operations": [consume_body(user, "a", 11)]}, format="json")
    assert response.status_code == 402
    assert api.post(BATCH, {"operations": [consume_body(user, "a", 10)]}, format="json").status_code == 201


def hold(api, user, tokens: int, **extra) -> str:
    response = api.post("/api/tokens/check", {"userId": user.pk, "tokens": tokens, "reserve": True, **extra},
                        format="json")
    assert response.json()["sufficient"] is True, response.content
    return response.json()["reservationId"]


def test_batch_items_settle_their_holds(api, users):
    basic, pro = users[0], users[1]
    a, b, c = hold(api, basic, 500), hold(api, basic, 300), hold(api, pro, 1_000)
    ops = [consume_body(basic, "s-a", 450, reservationId=a), consume_body(pro, "plain", 20),
           consume_body(basic, "s-b", 700, reservationId=b), consume_body(pro, "s-c", 1_000, reservationId=c)]
    response = api.post(BATCH, {"operations": ops}, format="json")
    assert response.status_code == 201, response.content
    results = response.json()["results"]
    assert [r["usage"]["used"] for r in results] == [450, 20, 1_150, 1_020]
    assert {r["usage"]["reserved"] for r in results} == {0}  # every hold of the batch settled
    assert set(Reservation.objects.filter(pk__in=[a, b, c]).values_list("status", flat=True)) == {"settled"}
    entries = {e.operation_id: e for e in LedgerEntry.objects.filter(kind="consumption")}
    assert [(entries[op].used_delta, entries[op].reserved_delta, str(entries[op].reservation_id))
            for op in ("s-a", "s-b", "s-c")] == [(450, -500, a), (700, -300, b), (1_000, -1_000, c)]
    assert entries["plain"].reservation_id is None and entries["plain"].reserved_delta == 0
    assert [(p.used, p.reserved) for p in (current_period(basic), current_period(pro))] == [(1_150, 0), (1_020, 0)]
    # the same batch again: replays, nothing charged twice
    again = api.post(BATCH, {"operations": ops}, format="json")
    assert again.status_code == 200 and again.json()["replayed"] == 4
    assert [r["entryId"] for r in again.json()["results"]] == [r["entryId"] for r in results]
    assert ledger_reconcile() == []


def test_the_batch_item_whose_settlement_passes_the_cap_is_named(api, users, spend):
    user = users[0]  # basic: cap 15,000
    spend(user, 14_000)
    reservation = hold(api, user, 500)  # 14,500 committed
    ops = [consume_body(user, "plain", 100), consume_body(users[1], "other", 5),
           consume_body(user, "settle", 901, reservationId=reservation)]  # 14,600 - 500 + 901 = 15,001
    before = snapshot()
    response = api.post(BATCH, {"operations": ops}, format="json", HTTP_X_REQUEST_ID="batch-settle-402")
    assert response.status_code == 402, response.content
    error = response.json()["error"]
    assert (error["code"], error["index"], error["available"], error["cap"]) == ("token_cap_exceeded", 2, 900, 15_000)
    assert snapshot() == before
    assert Reservation.objects.get(pk=reservation).status == "held"
    row = AuditLog.objects.get(request_id="batch-settle-402")
    assert (row.action, row.result, row.tokens, row.detail["index"]) == ("consume_batch", "token_cap_exceeded", 901, 2)
    ops[2]["tokens"] = 900  # exactly the cap
    assert api.post(BATCH, {"operations": ops}, format="json").status_code == 201
    period = current_period(user)
    assert (period.used, period.reserved) == (15_000, 0)
    assert ledger_reconcile() == []


def test_freed_holds_count_before_the_cap_is_applied(api, users, spend):
    """A plain item may use what a later item's settlement frees: the batch is one change."""
    user = users[0]
    spend(user, 14_000)
    reservation = hold(api, user, 1_000)  # the cap is reached
    ops = [consume_body(user, "plain", 600), consume_body(user, "settle", 400, reservationId=reservation)]
    response = api.post(BATCH, {"operations": ops}, format="json")
    assert response.status_code == 201, response.content
    assert current_period(user).used == 15_000
    assert ledger_reconcile() == []


@pytest.mark.parametrize("spoil,status,code", [
    ("release", 409, "reservation_expired"),
    ("settle", 409, "reservation_expired"),
    ("expire", 409, "reservation_expired"),
    ("repeat", 400, "duplicate_reservation"),
    ("other-user", 404, "reservation_not_found"),
])
def test_a_batch_item_with_an_unusable_hold_refuses_the_batch(api, users, spoil, status, code):
    user = users[0]
    first, second = hold(api, user, 100, ttlSeconds=60), hold(api, user, 100)
    ops = [consume_body(user, "fine", 50, reservationId=first), consume_body(users[1], "plain", 5),
           consume_body(user, "spoiled", 80, reservationId=second)]
    if spoil == "release":
        api.post("/api/tokens/release", {"userId": user.pk, "reservationId": second}, format="json")
    elif spoil == "settle":
        api.post("/api/tokens/consume", consume_body(user, "elsewhere", 70, reservationId=second), format="json")
    elif spoil == "expire":
        Reservation.objects.filter(pk=second).update(expires_at=Reservation.objects.get(pk=second).created_at)
    elif spoil == "repeat":
        ops[2]["reservationId"] = first
    else:
        ops[2] = consume_body(users[1], "spoiled", 80, reservationId=second)
    before = snapshot()
    response = api.post(BATCH, {"operations": ops}, format="json")
    assert response.status_code == status, response.content
    assert (response.json()["error"]["code"], response.json()["error"]["index"]) == (code, 2)
    assert snapshot() == before
    assert Reservation.objects.get(pk=first).status == "held"


def test_a_refused_batch_is_audited(api, users):
    ops = [*items_for(users[:1], 2), consume_body(users[0], "big", 15_001)]
    api.post(BATCH, {"operations": ops}, format="json", HTTP_X_REQUEST_ID="batch-req-1")
    row = AuditLog.objects.get(request_id="batch-req-1")
    assert (row.user_id, row.result, row.tokens) == (users[0].pk, "token_cap_exceeded", 15_001)
    assert row.detail["index"] == 2 and row.detail["items"] == 3
    assert row.service_key_id is not None


def _queries_for(api, ops) -> int:
    with CaptureQueriesContext(connection) as ctx:
        response = api.post(BATCH, {"operations": ops}, format="json")
    assert response.status_code == 201, response.content
    return len(ctx.captured_queries)


@pytest.fixture(params=[True, False], ids=["fast", "orm"])
def either_path(request, settings):
    settings.METERING_FAST_PATH = request.param


def test_query_count_does_not_grow_with_the_batch(api, make_user, either_path):
    users = [make_user("pro") for _ in range(20)]
    # open each user's period, as any earlier request this month would have
    _queries_for(api, [consume_body(u, f"warm-{u.pk}", 1) for u in users])
    small = _queries_for(api, items_for(users[:5], 10, "small"))
    large = _queries_for(api, items_for(users, 200, "large"))
    assert large == small, (small, large)
    # replays mixed with new items: constant too
    small_mixed = _queries_for(api, items_for(users[:5], 10, "small") + items_for(users[:5], 2, "s-new"))
    large_mixed = _queries_for(api, items_for(users, 200, "large") + items_for(users, 20, "l-new"))
    assert large_mixed == small_mixed, (small_mixed, large_mixed)
    assert LedgerEntry.objects.filter(operation_id__startswith="large-").count() == 200
    assert ledger_reconcile() == []


def test_one_user_large_batch_is_constant_too(api, make_user, either_path):
    user = make_user("enterprise")
    _queries_for(api, [consume_body(user, "warm", 1)])
    assert _queries_for(api, items_for([user], 10, "s")) == _queries_for(api, items_for([user], 500, "l"))
    assert ledger_reconcile() == []


# --- the set-based path (metering/services/consume/postgres.py) ------------------------------------------

def open_periods(api, users) -> None:
    """A first consume opens each user's period (through the ORM path); batches after it take the set-based path."""
    for user in users:
        assert api.post("/api/tokens/consume", consume_body(user, f"open-{user.pk}", 1), format="json").status_code == 201


def stored_responses(prefix: str) -> list[dict]:
    return list(LedgerEntry.objects.filter(operation_id__startswith=prefix).values_list("response", flat=True))


@pytest.mark.parametrize("limit,cap,reserved,rate", [
    (100_000, 120_000, 0, "0.000020"), (15_000, 15_000, 300, "0.000000"), (0, 0, 0, "0.000020"),
    (0, 500, 0, "1.500000"), (3, 7, 2, "0.333333"),
])
def test_the_one_usage_body_says_what_usage_says(limit, cap, reserved, rate):
    """The usage dict every answer carries is built in one place (contract.PeriodFigures: Usage.as_api,
    both batch paths, replays); made once per period and asked at every point from empty to past the
    limit, it says what Usage's own figures say, in the API's key order."""
    start, end = datetime(2026, 11, 1, tzinfo=UTC), datetime(2026, 12, 1, tzinfo=UTC)
    figures = PeriodFigures(tier="pro", limit=limit, reserved=reserved, cap=cap, overage_rate=Decimal(rate),
                            period_start=start, period_end=end, shared={})
    for used in sorted({0, 1, limit - 1, limit, limit + 1, cap - reserved, cap, cap + 5, 49_999, 50_000, 123_457}):
        used = max(used, 0)
        usage = Usage(tier="pro", limit=limit, used=used, reserved=reserved, cap=cap, overage_rate=Decimal(rate),
                      period_start=start, period_end=end)
        expected = {"tier": "pro", "limit": limit, "used": used, "reserved": reserved, "remaining": usage.remaining,
                    "available": usage.available, "usagePercentage": usage.percentage, "status": usage.status,
                    "cap": cap, "overage": {"tokens": usage.overage_tokens, "charge": format_usd(usage.overage_charge)},
                    "periodStart": "2026-11-01T00:00:00Z", "periodEnd": "2026-12-01T00:00:00Z"}
        got = figures.as_api(used)
        assert got == expected and list(got) == list(expected), used
        assert json.dumps(got) == json.dumps(expected)
        assert usage.as_api() == got


def test_a_batch_of_recorded_items_is_answered_by_the_orm_path_byte_for_byte(api, users):
    """The set-based path does not look for recorded operation ids first: the ledger's
    unique index refuses them, nothing is kept, and the ORM path answers the replay."""
    open_periods(api, users)
    ops = items_for(users, 12, "again")
    first = api.post(BATCH, {"operations": ops}, format="json")
    assert first.status_code == 201
    assert all("usageAfter" in r for r in stored_responses("again-"))  # the set-based path recorded it
    before, audits = snapshot(), AuditLog.objects.count()
    again = api.post(BATCH, {"operations": ops}, format="json")
    assert again.status_code == 200 and again["Content-Type"] == first["Content-Type"]
    # what each row stored (the usage after it, raw) formats, on replay, to the very bytes first sent
    assert again.content == first.content.replace(b'"result":"recorded"', b'"result":"replayed"').replace(
        b'{"recorded":12,"replayed":0,', b'{"recorded":0,"replayed":12,')
    assert snapshot() == before
    assert AuditLog.objects.count() == audits + 12  # one "replayed" row per item, nothing from the failed attempt
    assert AuditLog.objects.filter(result="replayed", operation_id__startswith="again-").count() == 12


def test_a_batch_answers_and_sends_usage_recorded_many_once_with_every_period_after(api, users):
    seen, sends = [], []

    def receiver(sender, changes, **kwargs):
        sends.append(len(changes))
        seen.extend((period.pk, period.account_id, period.used, used_before, period.token_limit, period.cap,
                     period._state.adding) for period, used_before in changes)

    def single(sender, **kwargs):
        raise AssertionError("a batch announces its periods together")

    open_periods(api, users)
    usage_recorded_many.connect(receiver)
    usage_recorded.connect(single)
    try:
        ops = items_for(users, 7, "sig")
        response = api.post(BATCH, {"operations": ops}, format="json")
        assert response.status_code == 201
        answer = response.json()
    finally:
        usage_recorded_many.disconnect(receiver)
        usage_recorded.disconnect(single)
    assert sends == [len(users)]
    assert all("usageAfter" in r for r in stored_responses("sig-"))
    expected = []
    for user in users:
        period = current_period(user)
        last = [r for r in answer["results"] if r["userId"] == user.pk][-1]
        assert last["usage"] == Usage(tier=user.token_account.tier.slug, limit=period.token_limit, used=period.used,
                                      reserved=period.reserved, cap=period.cap, overage_rate=period.overage_rate,
                                      period_start=period.starts_at, period_end=period.ends_at).as_api()
        spent = sum(op["tokens"] for op in ops if op["userId"] == user.pk)
        expected.append((period.pk, period.account_id, period.used, period.used - spent, period.token_limit,
                         period.cap, False))
    assert sorted(seen) == sorted(expected)


def _plan(queryset) -> str:
    sql, params = queryset.query.sql_with_params()
    with connection.cursor() as cursor:
        cursor.execute("SET LOCAL enable_seqscan = off")
        cursor.execute(f"EXPLAIN {sql}", params)
        return "\n".join(row[0] for row in cursor.fetchall())


def test_queries_that_used_the_dropped_indexes_still_find_an_index(api, users):
    """0006 dropped the single-column indexes on period.account, ledger.service_key,
    ledger.reservation and audit.service_key: the lookups that need one still have one."""
    user = users[0]
    assert api.post("/api/tokens/check", {"userId": user.pk, "tokens": 10, "reserve": True},
                    format="json").status_code == 200
    reservation = Reservation.objects.get(account__user=user)
    period = current_period(user)
    # a period by its account (account_for_user / period_current, and the cascade from Account)
    assert "period_unique_start" in _plan(UsagePeriod.objects.filter(account_id=period.account_id)) or \
        "period_account_recent" in _plan(UsagePeriod.objects.filter(account_id=period.account_id))
    # ledger rows of a reservation (deleting one checks PROTECT this way): the partial index
    assert "ledger_reservation" in _plan(LedgerEntry.objects.filter(reservation=reservation))
    assert list(LedgerEntry.objects.filter(reservation=reservation).values_list("kind", flat=True)) == ["reservation"]
    with connection.cursor() as cursor:
        cursor.execute("SELECT indexname FROM pg_indexes WHERE tablename IN "
                       "('metering_ledgerentry', 'metering_auditlog', 'metering_usageperiod')")
        names = {row[0] for row in cursor.fetchall()}
    assert not any(name.endswith(("service_key_id_5461c9af", "service_key_id_ea348067", "reservation_id_3bd31ece",
                                  "account_id_4b3194ec")) for name in names), names
