"""Group commit (metering/services/consume/combiner.py, consume_group.sql) on real
PostgreSQL, through the API, in real threads.

A group forms deterministically: a lock on one period (held by another connection) stops
the leader's write, the requests that arrive meanwhile queue behind it, and when the lock
goes they are written together in one statement. Each item keeps its own answer, as if
it had come alone."""
from __future__ import annotations

import threading
import time
from collections import Counter
from typing import Any, Callable

import psycopg
import pytest
from django.db import connection, transaction

from alerts.models import AlertEvent
from metering.models import AuditLog, LedgerEntry
from metering.services import SYSTEM, ConsumeRequest, ledger_reconcile, usage_consume
from metering.services.consume.dispatch import COMBINER

from .conftest import FLUSHED_APPS, consume_body, current_period, key_client

pytestmark = [pytest.mark.django_db(transaction=True, available_apps=FLUSHED_APPS), pytest.mark.within_one_period]


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


class PeriodLock:
    """Holds a period's row lock from a connection of its own, as a long write would."""

    def __init__(self, user) -> None:
        self.period_id = current_period(user).pk

    def __enter__(self) -> "PeriodLock":
        params = connection.get_connection_params()
        params.pop("cursor_factory", None)
        params.pop("context", None)
        self.conn = psycopg.connect(**params)
        self.conn.execute("SELECT 1 FROM metering_usageperiod WHERE id = %s FOR UPDATE", [self.period_id])
        return self

    def __exit__(self, *exc: Any) -> None:
        self.conn.rollback()
        self.conn.close()


def lock_waiters() -> int:
    """Backends of this database waiting for a lock."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                       " AND wait_event_type = 'Lock'")
        return cursor.fetchone()[0]


class Requests:
    """API consumes, each in a thread of its own; answers by name."""

    def __init__(self, raw_key: str) -> None:
        self.raw_key, self.threads, self.answers = raw_key, [], {}
        self.errors: list[BaseException] = []

    def start(self, name: str, body: dict) -> None:
        def run() -> None:
            try:
                response = key_client(self.raw_key).post("/api/tokens/consume", body, format="json")
                self.answers[name] = (response.status_code, response.json())
            except BaseException as error:  # noqa: BLE001 - reported in the test's thread
                self.errors.append(error)
            finally:
                connection.close()

        thread = threading.Thread(target=run)
        thread.start()
        self.threads.append(thread)

    def join(self) -> dict[str, tuple[int, dict]]:
        for thread in self.threads:
            thread.join(timeout=60)
        assert not any(t.is_alive() for t in self.threads), "a request hung"
        assert not self.errors, self.errors[:3]
        return self.answers


def as_one_group(raw_key: str, leader_body: dict, bodies: dict[str, dict], *, blocker, recorded: int,
                 groups: int = 1) -> dict[str, tuple[int, dict]]:
    """The leader's consume waits on `blocker`'s lock; `bodies` queue behind it and are
    written as one group once the lock goes (as `groups` when some share an operation
    id), which records `recorded` of them (the rest go alone). Returns every answer
    ("leader" too)."""
    groups_before, items_before, recorded_before = COMBINER.groups, COMBINER.items, COMBINER.recorded
    calls = Requests(raw_key)
    with blocker:
        calls.start("leader", leader_body)
        wait_until(lambda: lock_waiters() >= 1, "the leader's write to wait on the lock")
        for name, body in bodies.items():
            calls.start(name, body)
        wait_until(lambda: COMBINER.queued == len(bodies), "the requests to queue behind the leader")
    answers = calls.join()
    assert COMBINER.groups == groups_before + groups, "the queued requests went as one group"
    assert COMBINER.items == items_before + len(bodies)
    assert COMBINER.recorded == recorded_before + recorded
    return answers


def test_consumes_arriving_during_a_write_go_in_one_statement_each_with_its_own_answer(make_user, service_key):
    leader_user, users = make_user("pro"), [make_user("pro") for _ in range(3)]
    for user in users:
        current_period(user)  # a user's first consume opens the period on the ORM path
    bodies = {f"op-{i}": consume_body(users[i % 3], f"op-{i}", 100 + i) for i in range(12)}

    answers = as_one_group(service_key, consume_body(leader_user, "lead", 50), bodies,
                           blocker=PeriodLock(leader_user), recorded=12)

    assert {name: status for name, (status, _) in answers.items()} == {name: 201 for name in ["leader", *bodies]}
    for n, user in enumerate(users):
        mine = [answers[f"op-{i}"][1] for i in range(12) if i % 3 == n]
        total = sum(100 + i for i in range(12) if i % 3 == n)
        period = current_period(user)
        assert period.used == total
        # each answer shows the usage right after it: a running total in the group's order
        assert sorted(body["usage"]["used"] for body in mine)[-1] == total
        running = sorted(body["usage"]["used"] for body in mine)
        assert sorted(running[k] - running[k - 1] for k in range(1, len(running))) == sorted(
            body["tokens"] for body in mine if body["usage"]["used"] != running[0])
    for name, (status, body) in answers.items():
        entry = LedgerEntry.objects.get(pk=body["entryId"])
        assert (entry.operation_id, entry.used_delta, entry.kind) == (bodies.get(name, {"operationId": "lead"})[
            "operationId"], body["tokens"], "consumption")
        # a retry answers exactly what the first answer said
        replay = key_client(service_key).post("/api/tokens/consume", bodies.get(name) or consume_body(
            leader_user, "lead", 50), format="json")
        assert replay.status_code == 200 and replay.json() == body
    audit = AuditLog.objects.filter(action="consume", result="recorded", operation_id__startswith="op-")
    assert audit.count() == 12 and {row.user_id for row in audit} == {u.pk for u in users}
    assert ledger_reconcile() == []


def test_a_group_reaching_the_cap_records_the_items_that_fit_and_refuses_the_rest(make_user, service_key, spend):
    user = make_user("basic")  # limit 10,000, cap 15,000
    spend(user, 14_800)
    bodies = {f"cap-{i}": consume_body(user, f"cap-{i}", 60) for i in range(8)}  # room for 3

    answers = as_one_group(service_key, consume_body(user, "lead", 10), bodies, blocker=PeriodLock(user), recorded=3)

    statuses = Counter(status for name, (status, _) in answers.items() if name != "leader")
    assert answers["leader"][0] == 201
    assert statuses == {201: 3, 402: 5}
    assert all(body["error"]["code"] == "token_cap_exceeded" for status, body in answers.values() if status == 402)
    period = current_period(user)
    assert period.used == 14_800 + 10 + 3 * 60 <= period.cap
    assert AuditLog.objects.filter(user=user, action="consume", result="token_cap_exceeded").count() == 5
    assert ledger_reconcile() == []


def test_a_group_crossing_alert_thresholds_records_each_alert_once(make_user, service_key, spend):
    user = make_user("basic")
    spend(user, 7_000)  # 70%: the leader and the first item stay under 75%
    bodies = {f"th-{i}": consume_body(user, f"th-{i}", 400) for i in range(8)}  # to 102%: 75, 90, 100 and overage

    # the group records the first (to 74.1%); the one crossing 75% and those after it go alone
    answers = as_one_group(service_key, consume_body(user, "lead", 10), bodies, blocker=PeriodLock(user), recorded=1)

    assert {status for status, _ in answers.values()} == {201}
    assert current_period(user).used == 7_000 + 10 + 8 * 400
    alerts = Counter((a.kind, a.threshold) for a in AlertEvent.objects.filter(account__user=user))
    assert alerts == {("threshold", 75): 1, ("threshold", 90): 1, ("threshold", 100): 1, ("overage", 0): 1}
    assert ledger_reconcile() == []


def test_replays_duplicates_and_bad_names_in_a_group_are_answered_as_alone(make_user, service_key, spend):
    user, other = make_user("pro"), make_user("pro")
    first = key_client(service_key).post("/api/tokens/consume", consume_body(user, "seen", 70), format="json").json()
    bodies = {
        "replay": consume_body(user, "seen", 70),
        "conflict": consume_body(user, "seen", 71),
        "twin-a": consume_body(other, "twin", 30),
        "twin-b": consume_body(other, "twin", 30),
        "unknown-type": consume_body(user, "odd", 30, operation_type="no-such-type"),
        "unknown-user": {**consume_body(user, "nobody", 30), "userId": 987_654_321},
        "plain": consume_body(user, "plain", 40),
    }

    # the second of each pair sharing an operation id (conflict, twin-b) goes in the next group
    answers = as_one_group(service_key, consume_body(other, "lead", 10), bodies, blocker=PeriodLock(other),
                           recorded=2, groups=2)  # twin-a or twin-b, and plain

    assert answers["replay"] == (200, first)
    assert answers["conflict"][0] == 409 and answers["conflict"][1]["error"]["code"] == "operation_id_conflict"
    twins = sorted([answers["twin-a"], answers["twin-b"]], key=lambda a: a[0])
    assert [twins[0][0], twins[1][0]] == [200, 201] and twins[0][1] == twins[1][1]
    assert answers["unknown-type"][1]["error"]["code"] == "unknown_operation_type"
    assert answers["unknown-user"][0] == 404 and answers["unknown-user"][1]["error"]["code"] == "unknown_user"
    assert answers["plain"][0] == 201
    assert current_period(user).used == 70 + 40
    assert current_period(other).used == 10 + 30
    assert ledger_reconcile() == []


def test_a_group_whose_statement_fails_is_done_item_by_item_and_loses_nothing(make_user, service_key):
    """A consume of one of the group's operation ids commits in another transaction while
    the group waits for its lock: the group's insert hits the ledger's unique index and
    the statement fails as a whole; every item is then written alone (the duplicate is a
    replay)."""
    leader_user, user = make_user("pro"), make_user("pro")
    holding, release = threading.Event(), threading.Event()
    outside: list[Any] = []

    def consume_in_an_open_transaction() -> None:
        try:
            with transaction.atomic():
                outside.append(usage_consume(request=ConsumeRequest(
                    user_id=user.pk, operation_id="dup", tokens=25, operation_type="summary"), ctx=SYSTEM))
                holding.set()
                release.wait(30)
        finally:
            connection.close()

    current_period(user)
    bodies = {"dup": consume_body(user, "dup", 25), **{f"op-{i}": consume_body(user, f"op-{i}", 5) for i in range(5)}}
    groups_before, recorded_before = COMBINER.groups, COMBINER.recorded
    calls = Requests(service_key)
    holder = threading.Thread(target=consume_in_an_open_transaction)
    with PeriodLock(leader_user):
        calls.start("leader", consume_body(leader_user, "lead", 10))
        wait_until(lambda: lock_waiters() >= 1, "the leader's write to wait on the lock")
        for name, body in bodies.items():
            calls.start(name, body)
        wait_until(lambda: COMBINER.queued == len(bodies), "the requests to queue")
        holder.start()
        assert holding.wait(30)
    # the leader is done; the group now waits for the holder's lock on the user's period
    wait_until(lambda: COMBINER.groups == groups_before and lock_waiters() >= 1, "the group to wait on the holder")
    release.set()
    holder.join(30)
    answers = calls.join()

    assert COMBINER.groups == groups_before + 1 and COMBINER.recorded == recorded_before  # it failed whole
    assert answers["dup"][0] == 200 and answers["dup"][1] == outside[0].body
    assert all(answers[f"op-{i}"][0] == 201 for i in range(5))
    assert current_period(user).used == 25 + 5 * 5
    assert LedgerEntry.objects.filter(account__user=user, kind="consumption").count() == 6
    assert ledger_reconcile() == []


def test_64_clients_racing_one_user_to_the_cap_through_the_combiner(make_user, service_key, spend):
    user = make_user("basic")  # cap 15,000
    spend(user, 14_000)
    tokens = 37  # room for 27 of the 64: the leader and 26 of the 63 in the group
    bodies = {f"race-{i}": consume_body(user, f"race-{i}", tokens) for i in range(63)}

    answers = as_one_group(service_key, consume_body(user, "lead", tokens), bodies, blocker=PeriodLock(user),
                           recorded=26)  # the leader took one of the 27 places

    created = [body for status, body in answers.values() if status == 201]
    assert Counter(status for status, _ in answers.values()) == {201: 27, 402: 37}
    period = current_period(user)
    assert sum(body["tokens"] for body in created) == 27 * tokens
    assert period.used == 14_000 + 27 * tokens <= period.cap
    assert LedgerEntry.objects.filter(account__user=user, kind="consumption").count() == 1 + 27
    assert len({body["usage"]["used"] for body in created}) == 27
    assert ledger_reconcile() == []


def test_a_lone_consume_does_not_wait_for_company(make_user, service_key):
    user = make_user("pro")
    groups_before = COMBINER.groups
    response = key_client(service_key).post("/api/tokens/consume", consume_body(user, "alone", 5), format="json")
    assert response.status_code == 201
    assert COMBINER.groups == groups_before and COMBINER.queued == 0  # the single statement, no group


def test_a_consume_inside_a_transaction_is_never_combined(make_user, spend):
    """Its commit is the caller's: it must not carry other requests' rows."""
    user = make_user("pro")
    groups_before = COMBINER.groups
    with pytest.raises(RuntimeError), transaction.atomic():
        spend(user, 40)
        raise RuntimeError("the caller rolls back")
    assert current_period(user).used == 0
    assert COMBINER.groups == groups_before
