"""Daily rollups: built from the ledger by the job, equal to it, and never
missing a row that commits after a higher id was rolled up."""
from __future__ import annotations

import psycopg
import pytest
from django.db import connection
from django.utils import timezone

from metering import selectors
from metering.models import DailyUsage, LedgerEntry, LedgerRollupState
from metering.services import ledger_reconcile, ledger_rollup_refresh, ledger_rollup_verify, usage_adjust, usage_grant
from metering.tasks import ledger_rollup_refresh_task, ledger_rollup_verify_task

from .conftest import write_history

pytestmark = pytest.mark.within_one_period  # slow steps or processes of their own: start clear of a month's end


def _groups_total(user_id, kind="consumption"):
    account_id = selectors.account_id_for_user(user_id=user_id)
    return sum(g.used_delta for g in selectors.usage_groups(account_id=account_id, kind=kind))


@pytest.mark.django_db
def test_refresh_sums_the_ledger_per_day_and_verify_finds_no_drift(make_user, consume):
    user = make_user("pro")
    write_history(user, days=70, per_day=3)
    consume(user, 120, "analysis")
    consume(user, 80, "consensus", provider="anthropic", model="claude-sonnet-4")
    run = ledger_rollup_refresh(batch_size=50)  # several batches
    assert run.rows_read == 212 and run.pending == 0
    ledger_total = sum(LedgerEntry.objects.filter(account__user=user).values_list("used_delta", flat=True))
    assert sum(DailyUsage.objects.values_list("used_delta", flat=True)) == ledger_total == 70 * 3 * 10 + 200
    assert ledger_rollup_verify() == []
    # grouped by day: one row per (day, op, provider, model) with the entries counted
    today = timezone.now().date()
    today_rows = DailyUsage.objects.filter(day=today)
    assert {(r.operation_type, r.used_delta, r.entries) for r in today_rows} == {("analysis", 120, 1), ("consensus", 80, 1)}
    assert ledger_reconcile() == []  # counters still equal the ledger: rollups changed nothing there


@pytest.mark.django_db
def test_refresh_is_incremental_and_safe_to_run_twice(make_user, consume):
    user = make_user()
    consume(user, 100)
    ledger_rollup_refresh()
    again = ledger_rollup_refresh()
    assert again.rows_read == 0
    consume(user, 50)
    usage_grant(account=user.token_account, tokens=30, reason="goodwill", actor="support")
    run = ledger_rollup_refresh()
    assert run.rows_read == 2
    rows = {r.kind: (r.used_delta, r.entries) for r in DailyUsage.objects.filter(account__user=user)}
    assert rows == {"consumption": (150, 2), "grant": (-30, 1)}
    assert ledger_rollup_verify() == []


@pytest.mark.django_db
def test_readers_see_rows_past_the_watermark_live_without_double_counting(make_user, consume):
    user = make_user()
    consume(user, 100)
    ledger_rollup_refresh()
    consume(user, 40)  # not rolled up yet
    usage_adjust(account=user.token_account, tokens=5, reason="correction", actor="support")
    assert _groups_total(user.pk) == 140
    assert _groups_total(user.pk, kind=None) == 145
    ledger_rollup_refresh()
    assert _groups_total(user.pk) == 140 and _groups_total(user.pk, kind=None) == 145


@pytest.mark.django_db
def test_verify_reports_and_repairs_a_drifted_group(make_user, consume):
    user = make_user()
    consume(user, 100)
    consume(user, 7, "analysis")
    ledger_rollup_refresh()
    DailyUsage.objects.filter(operation_type="summary").update(used_delta=99)  # corrupt one group
    DailyUsage.objects.create(account=user.token_account, period_id=DailyUsage.objects.first().period_id,
                              day="2001-01-01", kind="consumption", used_delta=5, entries=1)  # a phantom group
    drifts = ledger_rollup_verify()
    assert {(d.key[3], d.key[4], d.ledger, d.rollup) for d in drifts} == {
        ("consumption", "summary", (100, 0, 1), (99, 0, 1)), ("consumption", "", (0, 0, 0), (5, 0, 1))}
    assert ledger_rollup_verify_task.delay().get() == 2  # the task repairs
    assert ledger_rollup_verify() == []
    assert _groups_total(user.pk) == 107


@pytest.mark.django_db(transaction=True)
def test_a_row_committing_after_a_higher_id_was_rolled_up_is_not_lost(make_user, consume):
    """Ids are taken at insert, visible at commit: hold one insert open in another
    connection while a later row commits and the rollup runs."""
    user = make_user()
    consume(user, 1)
    account = user.token_account
    period_id = LedgerEntry.objects.get(account=account).period_id
    settings_dict = connection.settings_dict
    other = psycopg.connect(host=settings_dict["HOST"], port=settings_dict["PORT"] or 5432,
                            user=settings_dict["USER"], dbname=settings_dict["NAME"])
    try:
        with other.cursor() as cursor:  # an open transaction (psycopg is not in autocommit)
            cursor.execute(
                "INSERT INTO metering_ledgerentry (account_id, period_id, kind, used_delta, reserved_delta, "
                "operation_id, operation_type, provider, model, actor, reason, fingerprint, created_at) "
                "VALUES (%s, %s, 'adjustment', 500, 0, '', '', '', '', 'slow', 'late commit', '', now()) RETURNING id",
                (account.pk, period_id))
            late_id = cursor.fetchone()[0]
        consume(user, 2)  # a higher id, committed first
        run = ledger_rollup_refresh_task.delay().get()
        state = LedgerRollupState.objects.get(pk=1)
        assert run["watermarkId"] > late_id and str(late_id) in state.pending_ids
        assert _groups_total(user.pk, kind=None) == 3  # the open insert is invisible to everyone
        other.commit()
        # committed below the watermark: readers see it at once, through the pending list
        assert _groups_total(user.pk, kind=None) == 503
        ledger_rollup_refresh()
        assert LedgerRollupState.objects.get(pk=1).pending_ids == {}
        assert _groups_total(user.pk, kind=None) == 503
        assert ledger_rollup_verify() == []
    finally:
        other.close()


@pytest.mark.django_db
def test_ids_of_rolled_back_rows_are_dropped_once_no_older_transaction_is_open(make_user, consume):
    user = make_user()
    consume(user, 1)
    with connection.cursor() as cursor:  # take an id the way a rolled-back insert does
        cursor.execute("SELECT nextval(pg_get_serial_sequence('metering_ledgerentry', 'id'))")
        burned = cursor.fetchone()[0]
    consume(user, 2)
    ledger_rollup_refresh()
    assert list(LedgerRollupState.objects.get(pk=1).pending_ids) == [str(burned)]
    run = ledger_rollup_refresh()  # no other transaction is open: that id can never appear
    assert run.dropped == 1 and run.pending == 0
    assert ledger_rollup_verify() == []


@pytest.mark.django_db
def test_pending_ids_wait_for_older_open_transactions_then_the_window(make_user, consume, settings):
    user = make_user()
    consume(user, 1)
    settings_dict = connection.settings_dict
    other = psycopg.connect(host=settings_dict["HOST"], port=settings_dict["PORT"] or 5432,
                            user=settings_dict["USER"], dbname=settings_dict["NAME"])
    try:
        other.execute("SELECT 1")  # a transaction open since before the id below is missed
        with connection.cursor() as cursor:
            cursor.execute("SELECT nextval(pg_get_serial_sequence('metering_ledgerentry', 'id'))")
        consume(user, 2)
        ledger_rollup_refresh()
        settings.ROLLUP_PENDING_SECONDS = 60
        assert ledger_rollup_refresh().pending == 1  # it might still be that transaction's row
        run = ledger_rollup_refresh(now=timezone.now() + timezone.timedelta(seconds=61))
        assert run.dropped == 1 and run.pending == 0
    finally:
        other.close()


def _truth(account_id):
    """The ledger summed directly, group by group: what the selectors must return."""
    from metering.services.rollups import _ledger_groups

    return {k[1:]: v for k, v in _ledger_groups(LedgerEntry.objects.filter(account_id=account_id)).items()}


def _seen(account_id):
    return {(g.period_id, g.day, g.kind, g.operation_type, g.provider, g.model): (g.used_delta, g.reserved_delta, g.entries)
            for g in selectors.usage_groups(account_id=account_id)}


@pytest.mark.django_db
def test_readers_equal_the_ledger_before_during_and_after_a_rollup(make_user, consume):
    user = make_user("enterprise")
    account_id = user.token_account.pk
    write_history(user, days=40, per_day=4)
    consume(user, 77, "analysis")
    from metering.services import SYSTEM, usage_check
    usage_check(user_id=user.pk, tokens=500, ctx=SYSTEM, reserve=True, operation_id="hold-1")
    assert _seen(account_id) == _truth(account_id)  # nothing rolled up: all live
    ledger_rollup_refresh(batch_size=37, max_batches=2)  # part of the way
    state = LedgerRollupState.objects.get(pk=1)
    assert 0 < DailyUsage.objects.count() and state.watermark_id < LedgerEntry.objects.order_by("-id").first().pk
    assert state.refreshed_at is None  # a backlog: readers must not bound the live slice by time yet
    assert _seen(account_id) == _truth(account_id)
    ledger_rollup_refresh()
    consume(user, 5, "summary")
    assert _seen(account_id) == _truth(account_id)


@pytest.mark.django_db
def test_rollups_command_refreshes_proves_and_repairs(make_user, consume, capsys):
    from django.core.management import CommandError, call_command

    user = make_user()
    consume(user, 100)
    call_command("rollups")
    assert "rollups equal the ledger" in capsys.readouterr().out
    DailyUsage.objects.update(used_delta=1)
    with pytest.raises(CommandError):
        call_command("rollups", "--no-refresh")
    assert "DRIFT" in capsys.readouterr().out
    call_command("rollups", "--repair")
    assert ledger_rollup_verify() == []


@pytest.mark.django_db
def test_dashboard_for_a_user_without_a_tier(make_user):
    from django.test import Client

    user = make_user(tier=None)
    client = Client()
    client.force_login(user)
    page = client.get("/dashboard/")
    assert page.status_code == 200 and b"You have no plan yet." in page.content


@pytest.mark.django_db(transaction=True)
def test_concurrent_refreshes_while_consuming_count_every_row_once(make_user, consume):
    import threading

    from django.db import connection as conn

    user = make_user("enterprise")
    write_history(user, days=20, per_day=10)
    errors = []
    stop = threading.Event()

    def refresher():
        try:
            while not stop.is_set():
                ledger_rollup_refresh(batch_size=25)
        except BaseException as exc:  # reported below
            errors.append(exc)
        finally:
            conn.close()

    threads = [threading.Thread(target=refresher) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        for _ in range(40):
            consume(user, 3, "analysis")
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
    assert not errors
    ledger_rollup_refresh()
    assert ledger_rollup_verify() == []
    assert _groups_total(user.pk) == 20 * 10 * 10 + 40 * 3
    assert sum(DailyUsage.objects.values_list("entries", flat=True)) == 240
