"""Management commands: demo (idempotent, its users' and staff's logins work), reconcile (drift, caps
passed and exit code), create_service_key (a working key)."""
from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from datetime import datetime, timezone as dt_timezone
from pathlib import Path

import pytest
import time_machine
from django.core.management import CommandError, call_command
from django.db import connection
from django.db.models import F
from rest_framework.test import APIClient

from metering.models import LedgerEntry, UsagePeriod
from metering.services import account_for_user, ledger_reconcile, usage_get
from console.services import SUPPORT_GROUP

from .conftest import FLUSHED_APPS, consume_body, key_client

pytestmark = pytest.mark.within_one_period  # slow steps or processes of their own: start clear of a month's end

ROOT = Path(__file__).resolve().parents[2]
DEMO_TIME = datetime(2026, 11, 17, 15, 30, tzinfo=dt_timezone.utc)


def run(*args) -> str:
    out = io.StringIO()
    call_command(*args, stdout=out, stderr=io.StringIO())
    return out.getvalue()


@pytest.mark.django_db
def test_demo_is_idempotent_and_its_key_works(django_user_model):
    with time_machine.travel(DEMO_TIME, tick=False):
        first = run("demo")
        ledger_rows = LedgerEntry.objects.count()
    with time_machine.travel(DEMO_TIME.replace(day=20), tick=False):
        second = run("demo")
    assert first == second
    assert LedgerEntry.objects.count() == ledger_rows > 0
    assert django_user_model.objects.filter(is_staff=False).count() == 3

    users = re.findall(r"^USER (\w+) id=(\d+) tier=(\w+) password=(\S+)$", first, re.M)
    assert [(name, tier) for name, _, tier, _ in users] == [("alice", "basic"), ("bob", "pro"),
                                                            ("carol", "enterprise")]
    keys = re.findall(r"^SERVICE_KEY=(\S+)$", first, re.M)
    assert len(keys) == 1

    client = key_client(keys[0])
    expected_share = {"alice": 40, "bob": 60, "carol": 30}
    with time_machine.travel(DEMO_TIME.replace(day=20), tick=False):
        for name, user_id, tier, password in users:
            body = client.get(f"/api/tokens/usage?userId={user_id}").json()
            assert body["tier"] == tier
            assert abs(body["usagePercentage"] - expected_share[name]) < 1, body
            assert body["status"] in ("low", "moderate")  # every alert threshold still ahead
            browser = APIClient()
            assert browser.login(username=name, password=password)
        consume = client.post("/api/tokens/consume", consume_body(django_user_model.objects.get(username="alice"),
                                                                  "after-demo", 10), format="json")
        assert consume.status_code == 201

    for name, user_id, _, _ in users:  # two months of history before this one
        periods = list(UsagePeriod.objects.filter(account__user_id=user_id).order_by("starts_at"))
        assert [p.starts_at.month for p in periods] == [9, 10, 11]
        assert all(p.used > 0 for p in periods)
        history = LedgerEntry.objects.filter(account__user_id=user_id, operation_id__startswith="demo-").order_by()
        assert set(history.values_list("operation_type", flat=True).distinct()) == {
            "consensus", "analysis", "summary", "comparison"}
        assert not history.filter(estimated_tokens=None).exists()
    assert ledger_reconcile() == []


@pytest.mark.django_db
def test_demo_staff_logins_sign_in_to_the_admin(django_user_model, client):
    first = run("demo")
    staff = re.findall(r"^STAFF (\w+) password=(\S+)$", first, re.M)
    assert [name for name, _ in staff] == ["support", "admin"]
    assert run("demo") == first  # the same logins, still working, on a second run

    support = django_user_model.objects.get(username="support")
    assert support.is_staff and not support.is_superuser
    assert list(support.groups.values_list("name", flat=True)) == [SUPPORT_GROUP]
    assert support.has_perm("metering.change_account") and not support.has_perm("metering.add_servicekey")
    admin = django_user_model.objects.get(username="admin")
    assert admin.is_staff and admin.is_superuser

    for name, password in staff:
        client.logout()
        signed_in = client.post("/admin/login/?next=/admin/", {"username": name, "password": password})
        assert signed_in.status_code == 302 and signed_in["Location"] == "/admin/", name
        console = client.get("/admin/")
        assert console.status_code == 200 and console.context["user"].username == name
        # support sees the accounts but not the superuser-only service keys
        assert ("/admin/metering/servicekey/" in console.content.decode()) == (name == "admin")
        assert "/admin/metering/account/" in console.content.decode()


@pytest.mark.django_db
def test_reconcile_reports_drift_in_process(make_user, api):
    user = make_user()
    api.post("/api/tokens/consume", consume_body(user, "x", 100), format="json")
    assert "OK" in run("reconcile")
    UsagePeriod.objects.filter(account__user=user).update(used=F("used") + 7)
    with pytest.raises(CommandError, match="1 period"):
        run("reconcile")


@pytest.mark.django_db
def test_reconcile_finds_a_ledger_row_naming_another_account(make_user, api):
    """The ledger's account is not a database-checked foreign key (models.py): reconcile checks it."""
    from metering.models import LedgerEntry

    user, other = make_user(), make_user()
    api.post("/api/tokens/consume", consume_body(user, "x", 100), format="json")
    api.post("/api/tokens/consume", consume_body(other, "y", 100), format="json")
    assert "OK" in run("reconcile")
    entry = LedgerEntry.objects.get(account__user=user, operation_id="x")
    LedgerEntry.objects.filter(pk=entry.pk).update(account=other.token_account)
    with pytest.raises(CommandError, match="1 ledger row"):
        run("reconcile")


@pytest.mark.django_db
def test_reconcile_finds_a_ledger_row_whose_period_is_missing(make_user, api):
    """Nor is the ledger's period (models.py): a row pointing at no period is reported."""
    user = make_user()
    api.post("/api/tokens/consume", consume_body(user, "x", 100), format="json")
    api.post("/api/tokens/consume", consume_body(user, "y", 50), format="json")
    assert "OK" in run("reconcile")
    entry = LedgerEntry.objects.get(account__user=user, operation_id="x")
    missing = UsagePeriod.objects.order_by("-pk").values_list("pk", flat=True).first() + 1000
    LedgerEntry.objects.filter(pk=entry.pk).update(period_id=missing)
    out = io.StringIO()
    with pytest.raises(CommandError, match="1 ledger row"):
        call_command("reconcile", stdout=out)
    assert f"[{entry.pk}]" in out.getvalue()


@pytest.mark.django_db
def test_deleting_a_user_keeps_their_audit_rows_without_the_user(make_user, api, django_user_model):
    from metering.models import AuditLog

    user = make_user()
    api.post("/api/tokens/estimate", {"userId": user.pk, "operationType": "summary", "topic": "t"}, format="json")
    rows = list(AuditLog.objects.filter(user=user).values_list("pk", flat=True))
    assert rows
    django_user_model.objects.filter(pk=user.pk).delete()  # through Django: on_delete applies
    assert set(AuditLog.objects.filter(pk__in=rows).values_list("user_id", flat=True)) == {None}


def _manage(*args: str) -> subprocess.CompletedProcess:
    db = connection.settings_dict  # the server the tests use (scripts/test.sh may have started it on any port)
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "consensus_tokens.settings.test",
           "DATABASE_URL": f"postgres://{db['USER']}@{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}/{db['NAME']}"}
    return subprocess.run([sys.executable, "manage.py", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)


@pytest.mark.django_db(transaction=True, available_apps=FLUSHED_APPS)
def test_reconcile_exits_non_zero_on_drift(make_user, api):
    user = make_user()
    api.post("/api/tokens/consume", consume_body(user, "x", 100), format="json")
    api.post("/api/tokens/check", {"userId": user.pk, "tokens": 50, "reserve": True}, format="json")
    clean = _manage("reconcile")
    assert clean.returncode == 0, clean.stderr
    assert "OK" in clean.stdout

    period = usage_get(user_id=user.pk)
    UsagePeriod.objects.filter(account__user=user).update(used=F("used") + 7, reserved=F("reserved") - 50)
    drift = _manage("reconcile")
    assert drift.returncode != 0
    pk = UsagePeriod.objects.get(account=account_for_user(user_id=user.pk)).pk
    assert f"DRIFT period={pk} user={user.pk} used=107 ledger=100 reserved=0 ledger_reserved=50" in drift.stdout
    assert period.used == 100


@pytest.mark.django_db(transaction=True, available_apps=FLUSHED_APPS)
def test_reconcile_reports_a_period_over_its_cap_and_consumptions_that_passed_it(make_user, api):
    user = make_user()  # basic: cap 15,000
    api.post("/api/tokens/check", {"userId": user.pk, "tokens": 50, "reserve": True}, format="json")  # opens the period
    api.post("/api/tokens/consume", consume_body(user, "fast", 100), format="json")  # stores "usageAfter"
    api.post("/api/tokens/consume", consume_body(user, "orm", 13_000), format="json")  # crosses 75%: "usage"
    assert _manage("reconcile").returncode == 0
    period = UsagePeriod.objects.get(account__user=user)
    fast = LedgerEntry.objects.get(operation_id="fast", kind="consumption")
    orm = LedgerEntry.objects.get(operation_id="orm", kind="consumption")
    assert "usageAfter" in fast.response and "usage" in orm.response
    with connection.cursor() as cursor:  # as the old rule left them: counters and answers past the cap
        cursor.execute("UPDATE metering_usageperiod SET cap = 13000 WHERE id = %s", [period.pk])
        cursor.execute("UPDATE metering_ledgerentry SET response = jsonb_set(response, '{usageAfter,used}', '14990')"
                       " WHERE id = %s", [fast.pk])
        cursor.execute("UPDATE metering_ledgerentry SET response = jsonb_set(response, '{usage,used}', '15951')"
                       " WHERE id = %s", [orm.pk])
    found = _manage("reconcile")
    assert found.returncode != 0
    lines = found.stdout.splitlines()
    assert f"OVER_CAP period={period.pk} user={user.pk} used=13100 reserved=50 cap=13000 " \
           f"(used + reserved passes the cap by 150)" in lines
    assert f"PASSED_CAP period={period.pk} user={user.pk} entry={fast.pk} operation=fast used=14990 reserved=50 " \
           f"cap=15000 (the answer it stored passed the cap by 40)" in lines
    assert f"PASSED_CAP period={period.pk} user={user.pk} entry={orm.pk} operation=orm used=15951 reserved=50 " \
           f"cap=15000 (the answer it stored passed the cap by 1001)" in lines
    assert not any(line.startswith("DRIFT") for line in lines)
    assert "1 period(s) are over their cap; 2 consumption(s) took their period past its cap" in found.stderr


@pytest.mark.django_db
@pytest.mark.parametrize("scope,consume_status", [("consume", 201), ("read", 403)])
def test_create_service_key_prints_a_working_key(make_user, scope, consume_status):
    user = make_user()
    output = run("create_service_key", "billing-worker", "--scope", scope)
    raw = re.fullmatch(r"SERVICE_KEY=(\S+)\n", output).group(1)
    client = key_client(raw)
    assert client.get(f"/api/tokens/usage?userId={user.pk}").status_code == 200
    assert client.post("/api/tokens/consume", consume_body(user, "k", 5), format="json").status_code == consume_status
    assert run("create_service_key", "billing-worker", "--scope", scope) != output  # a new key each time
