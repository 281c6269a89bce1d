"""Races on real PostgreSQL: real threads, each with its own connection, against
the API. The cap holds, no update is lost, counters equal the ledger."""
from __future__ import annotations

import pytest

from metering.models import AuditLog, LedgerEntry, Reservation
from metering.services import SYSTEM, ledger_reconcile, reconcile, usage_check

from .conftest import FLUSHED_APPS, consume_body, current_period, key_client, run_concurrently

pytestmark = [pytest.mark.django_db(transaction=True, available_apps=FLUSHED_APPS), pytest.mark.within_one_period,
              pytest.mark.parametrize("fast_path", [True, False], ids=["fast", "orm"])]

THREADS = 64


@pytest.fixture(autouse=True)
def _path(settings, fast_path):
    settings.METERING_FAST_PATH = fast_path


@pytest.fixture(scope="module", autouse=True)
def _room_for_the_race(django_db_blocker):
    """A race needs a connection per thread: on a server other clients fill, say so instead of
    failing with 503s (scripts/test.sh starts a server of its own when the standard one is full)."""
    from django.db import connection

    with django_db_blocker.unblock(), connection.cursor() as cursor:
        cursor.execute("SELECT current_setting('max_connections')::int"
                       " - current_setting('superuser_reserved_connections')::int"
                       " - (SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend')")
        free = cursor.fetchone()[0]
    if free < THREADS + 4:
        pytest.fail(f"PostgreSQL has {free} connections free; these races need {THREADS + 4}. Run the suite with "
                    "scripts/test.sh, which starts a PostgreSQL of its own when the standard one is this full.")


def _post(raw_key: str, path: str, body: dict) -> tuple[int, dict]:
    response = key_client(raw_key).post(path, body, format="json")
    return response.status_code, response.json()


def test_concurrent_consumes_near_the_cap_never_pass_it_and_lose_nothing(make_user, service_key, spend):
    user = make_user("basic")  # limit 10,000, cap 15,000
    spend(user, 14_000)
    tokens = 37  # 1,000 left: room for 27 of the 64

    results = run_concurrently(THREADS, lambda i: _post(
        service_key, "/api/tokens/consume", consume_body(user, f"race-{i}", tokens)))

    statuses = sorted(s for s, _ in results)
    created = [body for s, body in results if s == 201]
    assert set(statuses) == {201, 402}, statuses
    assert len(created) == 1_000 // tokens == 27
    assert all(body["error"]["code"] == "token_cap_exceeded" for s, body in results if s == 402)
    period = current_period(user)
    assert period.used == 14_000 + len(created) * tokens <= period.cap == 15_000
    assert LedgerEntry.objects.filter(account__user=user, kind="consumption").count() == 1 + len(created)
    # every answer showed a distinct running total: no two updates saw the same state
    assert len({body["usage"]["used"] for body in created}) == len(created)
    assert max(body["usage"]["used"] for body in created) == period.used
    assert ledger_reconcile() == []
    assert AuditLog.objects.filter(user=user, action="consume", result="token_cap_exceeded").count() == 64 - 27


def test_concurrent_consumes_with_room_all_count(make_user, service_key):
    user = make_user("pro")
    results = run_concurrently(THREADS, lambda i: _post(
        service_key, "/api/tokens/consume", consume_body(user, f"op-{i}", 100 + i)))
    assert [s for s, _ in results] == [201] * THREADS
    assert current_period(user).used == sum(100 + i for i in range(THREADS))
    assert ledger_reconcile() == []


def test_concurrent_reservations_near_the_cap_never_pass_it(make_user, service_key, spend):
    user = make_user("basic")
    spend(user, 14_000)

    results = run_concurrently(THREADS, lambda i: _post(
        service_key, "/api/tokens/check",
        {"userId": user.pk, "tokens": 100, "reserve": True, "operationId": f"hold-{i}"}))

    assert {s for s, _ in results} == {200}
    granted = [body for _, body in results if body["sufficient"]]
    refused = [body for _, body in results if not body["sufficient"]]
    assert len(granted) == 10 and len(refused) == THREADS - 10
    assert all("reservationId" in b for b in granted) and not any("reservationId" in b for b in refused)
    assert len({b["reservationId"] for b in granted}) == 10
    period = current_period(user)
    assert (period.used, period.reserved) == (14_000, 1_000)
    assert Reservation.objects.filter(account__user=user, status="held").count() == 10
    assert ledger_reconcile() == []


def test_concurrent_reservations_and_consumes_together_respect_the_cap(make_user, service_key, spend):
    user = make_user("basic")
    spend(user, 13_000)  # 2,000 left

    def work(i: int) -> tuple[str, int, dict]:
        if i % 2:
            return ("consume", *_post(service_key, "/api/tokens/consume", consume_body(user, f"c-{i}", 150)))
        return ("reserve", *_post(service_key, "/api/tokens/check",
                                  {"userId": user.pk, "tokens": 150, "reserve": True, "operationId": f"r-{i}"}))

    results = run_concurrently(THREADS, work)
    consumed = sum(1 for kind, s, _ in results if kind == "consume" and s == 201)
    reserved = sum(1 for kind, s, b in results if kind == "reserve" and b.get("sufficient"))
    assert consumed + reserved == 2_000 // 150 == 13
    period = current_period(user)
    assert period.used == 13_000 + consumed * 150
    assert period.reserved == reserved * 150
    assert period.used + period.reserved <= period.cap
    assert ledger_reconcile() == []


def test_twenty_concurrent_replays_charge_once(make_user, service_key):
    user = make_user("basic")
    body = consume_body(user, "same-op", 321, provider="openai", model="gpt-4o", estimatedTokens=300)

    results = run_concurrently(20, lambda i: _post(service_key, "/api/tokens/consume", body))

    statuses = sorted(s for s, _ in results)
    assert statuses == [200] * 19 + [201]
    bodies = [b for _, b in results]
    assert all(b == bodies[0] for b in bodies)
    assert bodies[0]["usage"]["used"] == 321
    assert current_period(user).used == 321
    assert LedgerEntry.objects.filter(account__user=user, operation_id="same-op").count() == 1
    assert ledger_reconcile() == []


def test_twenty_concurrent_replays_at_the_cap_are_replays_not_refusals(make_user, service_key, spend):
    """The first one fills the cap exactly; the other nineteen must still be
    answered as replays (200), not as a 402 for a second charge."""
    user = make_user("basic")
    spend(user, 14_500)
    body = consume_body(user, "last-op", 500)

    results = run_concurrently(20, lambda i: _post(service_key, "/api/tokens/consume", body))

    assert sorted(s for s, _ in results) == [200] * 19 + [201], [b for s, b in results if s not in (200, 201)]
    assert all(b == results[0][1] for _, b in results)
    assert current_period(user).used == 15_000
    assert ledger_reconcile() == []


def test_twenty_concurrent_settles_of_one_reservation_charge_once(make_user, service_key):
    user = make_user("basic")
    client = key_client(service_key)
    hold = client.post("/api/tokens/check", {"userId": user.pk, "tokens": 400, "reserve": True,
                                             "operationId": "settle-op"}, format="json").json()
    body = consume_body(user, "settle-op", 420, reservationId=hold["reservationId"])

    results = run_concurrently(20, lambda i: _post(service_key, "/api/tokens/consume", body))

    assert sorted(s for s, _ in results) == [200] * 19 + [201], [b for s, b in results if s not in (200, 201)]
    assert all(b == results[0][1] for _, b in results)
    period = current_period(user)
    assert (period.used, period.reserved) == (420, 0)
    assert Reservation.objects.get(pk=hold["reservationId"]).status == "settled"
    assert ledger_reconcile() == []


def test_64_concurrent_settlements_of_one_token_holds_with_huge_amounts_never_pass_the_cap(make_user, service_key):
    """Each settles its own 1-token hold: half ask for a million tokens (never room for that),
    half for 1,500 (room for nine: 64 held + 9 x 1,499 <= 15,000 < 64 + 10 x 1,499)."""
    user = make_user("basic")  # cap 15,000
    # placed through the service: the 64 settlements are all the requests the user's hourly rate allows
    holds = [str(usage_check(user_id=user.pk, tokens=1, ctx=SYSTEM, reserve=True, operation_id=f"hold-{i}")
                 .reservation.pk) for i in range(THREADS)]
    amounts = [1_000_000 if i % 2 else 1_500 for i in range(THREADS)]

    results = run_concurrently(THREADS, lambda i: _post(service_key, "/api/tokens/consume", consume_body(
        user, f"hold-{i}", amounts[i], reservationId=holds[i])))

    settled = [i for i, (status, _) in enumerate(results) if status == 201]
    refused = [i for i, (status, _) in enumerate(results) if status == 402]
    assert len(settled) == 9 and len(refused) == THREADS - 9, [b for s, b in results if s not in (201, 402)]
    assert {amounts[i] for i in settled} == {1_500}
    assert all(body["error"]["code"] == "token_cap_exceeded" for status, body in results if status == 402)
    period = current_period(user)
    recorded = sum(LedgerEntry.objects.filter(account__user=user, kind="consumption").values_list("used_delta",
                                                                                                  flat=True))
    assert recorded == period.used == 9 * 1_500 <= period.cap == 15_000
    assert period.reserved == THREADS - 9 and period.used + period.reserved <= period.cap
    statuses = dict(Reservation.objects.filter(pk__in=holds).values_list("pk", "status"))
    assert sorted(str(pk) for pk, status in statuses.items() if status == "settled") == sorted(holds[i] for i in settled)
    assert all(statuses[pk] == "held" for pk in statuses if str(pk) in {holds[i] for i in refused})
    assert AuditLog.objects.filter(user=user, action="consume", result="token_cap_exceeded").count() == THREADS - 9
    assert ledger_reconcile() == [] and not reconcile()


def test_concurrent_identical_batches_settling_holds_record_once(make_user, service_key):
    """The copies that wait on the holds' locks find them settled: they answer with the replays."""
    users = [make_user("pro") for _ in range(2)]
    holds = [str(usage_check(user_id=users[i % 2].pk, tokens=100, ctx=SYSTEM, reserve=True).reservation.pk)
             for i in range(6)]
    operations = [consume_body(users[i % 2], f"settle-{i}", 150, reservationId=holds[i]) for i in range(6)]

    results = run_concurrently(8, lambda i: _post(service_key, "/api/tokens/consume/batch",
                                                  {"operations": operations}))

    assert sorted(s for s, _ in results) == [200] * 7 + [201], [b for s, b in results if s not in (200, 201)]
    assert [(current_period(u).used, current_period(u).reserved) for u in users] == [(450, 0), (450, 0)]
    assert set(Reservation.objects.filter(pk__in=holds).values_list("status", flat=True)) == {"settled"}
    assert LedgerEntry.objects.filter(kind="consumption").count() == 6
    assert ledger_reconcile() == [] and not reconcile()


def test_concurrent_identical_batches_record_once(make_user, service_key):
    users = [make_user("pro") for _ in range(3)]
    operations = [consume_body(users[i % 3], f"batch-{i}", 10 + i) for i in range(60)]

    results = run_concurrently(8, lambda i: _post(service_key, "/api/tokens/consume/batch",
                                                  {"operations": operations}))

    assert sorted(s for s, _ in results) == [200] * 7 + [201], [b for s, b in results if s not in (200, 201)]
    first = next(b for s, b in results if s == 201)
    for status, body in results:
        assert [r["entryId"] for r in body["results"]] == [r["entryId"] for r in first["results"]]
        if status == 200:
            assert (body["recorded"], body["replayed"]) == (0, 60)
    for n, user in enumerate(users):
        assert current_period(user).used == sum(10 + i for i in range(n, 60, 3))
    assert LedgerEntry.objects.filter(kind="consumption").count() == 60
    assert ledger_reconcile() == []


@pytest.mark.parametrize("take_turns", [True, False], ids=["turns", "row-locks"])
def test_concurrent_batches_over_the_same_users_each_see_the_usage_after_their_own_items(
        make_user, service_key, settings, take_turns):
    """Batches for shared users write one after another (BATCH_WRITES_TAKE_TURNS) or
    meet on the periods' row locks: either way every item is recorded once, and the
    usage each item answers is the period right after it - no two items of any batch
    claim the same point, and the last is the period's total."""
    settings.BATCH_WRITES_TAKE_TURNS = take_turns
    users = [make_user("pro") for _ in range(4)]

    def batch(i: int) -> tuple[int, dict]:
        ops = [consume_body(users[j % 4], f"t{i}-{j}", 1 + (i * 7 + j) % 13) for j in range(12)]
        return _post(service_key, "/api/tokens/consume/batch", {"operations": ops})

    results = run_concurrently(12, batch)
    assert [status for status, _ in results] == [201] * 12, [body for status, body in results if status != 201]
    points: dict[int, list[int]] = {user.pk: [] for user in users}
    for _, body in results:
        for item in body["results"]:
            points[item["userId"]].append(item["usage"]["used"])
    for user in users:
        used = current_period(user).used
        assert len(points[user.pk]) == 36 and len(set(points[user.pk])) == 36
        assert max(points[user.pk]) == used == sum(
            1 + (i * 7 + j) % 13 for i in range(12) for j in range(12) if users[j % 4] == user)
    assert LedgerEntry.objects.filter(kind="consumption").count() == 144
    assert ledger_reconcile() == []


def test_a_fast_batch_waits_its_turn_for_the_write(make_user, service_key, settings, fast_path):
    """BATCH_WRITES_TAKE_TURNS: while another session holds the batches' advisory lock, a
    set-based batch waits before writing, then records; the ORM path never takes it."""
    import threading

    import psycopg
    from django.db import connection

    from metering.services.consume import postgres

    settings.BATCH_WRITES_TAKE_TURNS = True
    users = [make_user("pro") for _ in range(2)]
    for user in users:  # open their periods: a batch for users without one takes the ORM path
        assert _post(service_key, "/api/tokens/consume", consume_body(user, f"open-{user.pk}", 1))[0] == 201
    ops = [consume_body(users[j % 2], f"turn-{j}", 5) for j in range(4)]
    db = connection.settings_dict
    key = postgres.TAKE_TURN.split("(", 1)[1].rstrip(")")
    with psycopg.connect(host=db["HOST"] or "127.0.0.1", port=db["PORT"] or 5432, user=db["USER"],
                         dbname=db["NAME"], autocommit=True) as other:
        other.execute(f"SELECT pg_advisory_lock({key})")
        result: list[tuple[int, dict]] = []
        worker = threading.Thread(target=lambda: (result.append(
            _post(service_key, "/api/tokens/consume/batch", {"operations": ops})), connection.close()))
        worker.start()
        worker.join(timeout=1.5)
        assert worker.is_alive() == fast_path  # the fast path waits; the ORM path has answered
        other.execute(f"SELECT pg_advisory_unlock({key})")
        worker.join(timeout=30)
    assert result and result[0][0] == 201, result
    assert LedgerEntry.objects.filter(operation_id__startswith="turn-").count() == 4
    assert ledger_reconcile() == []


def test_concurrent_batches_and_consumes_near_the_cap(make_user, service_key, spend):
    user = make_user("basic")
    spend(user, 14_000)

    def work(i: int) -> tuple[int, int]:
        if i % 4 == 0:  # a batch of three 50-token items
            ops = [consume_body(user, f"b{i}-{j}", 50) for j in range(3)]
            status, _ = _post(service_key, "/api/tokens/consume/batch", {"operations": ops})
            return status, 150
        status, _ = _post(service_key, "/api/tokens/consume", consume_body(user, f"s{i}", 50))
        return status, 50

    results = run_concurrently(32, work)
    charged = sum(tokens for status, tokens in results if status == 201)
    assert {status for status, _ in results} <= {201, 402}
    period = current_period(user)
    assert period.used == 14_000 + charged
    assert period.used <= 15_000 and charged >= 1_000 - 100  # refused only once the room was nearly gone
    assert ledger_reconcile() == []


def test_concurrent_reserves_with_one_operation_id_hold_once(make_user, service_key):
    user = make_user("basic")
    results = run_concurrently(16, lambda i: _post(service_key, "/api/tokens/check", {
        "userId": user.pk, "tokens": 600, "reserve": True, "operationId": "one-hold"}))
    assert {s for s, _ in results} == {200}
    assert len({b["reservationId"] for _, b in results}) == 1
    assert all(b["sufficient"] for _, b in results)
    assert current_period(user).reserved == 600
    assert Reservation.objects.filter(account__user=user).count() == 1
    assert ledger_reconcile() == []
