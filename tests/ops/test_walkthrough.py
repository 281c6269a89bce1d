"""The README's walk-through ("The two commands"), against a server started the way a newcomer
starts it: `bash scripts/run.sh` itself, on its embedded default (SQLite, no Redis), on a free
port, then every step with the logins and service key it printed.

No test database: the server has its own SQLite file, and everything here is HTTP.
"""
from __future__ import annotations

import importlib
import os
import re
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest
import requests

from .conftest import ROOT, free_port, port_open, wait_for

pytestmark = pytest.mark.within_one_period

SEEDED_PROVIDERS = [p["slug"] for p in importlib.import_module(
    "metering.migrations.0002_seed_tiers_operations_providers").PROVIDERS]
STARTUP_SECONDS = 240  # a first start in a fresh clone is under a minute; an install of a changed pyproject adds more


@dataclass
class RunSh:
    url: str
    log_path: Path
    users: dict[str, tuple[int, str]]  # name -> (id, password)
    staff: dict[str, str]  # name -> password
    service_key: str

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def api(self) -> requests.Session:
        session = requests.Session()
        session.headers["Authorization"] = f"Api-Key {self.service_key}"
        return session


@pytest.fixture(scope="module")
def run_sh(tmp_path_factory) -> Iterator[RunSh]:
    tmp = tmp_path_factory.mktemp("run-sh")
    port = free_port()
    # The test runner's settings are not run.sh's. The clock is the test's (moved or real, clear of a
    # month's end: the walk must stay in one period); the dates asked below are the server's.
    env = {key: value for key, value in os.environ.items()
           if key not in ("REDIS_URL", "DJANGO_SETTINGS_MODULE", "SITE_URL")}
    env.update(PORT=str(port), DATABASE_URL=f"sqlite:///{tmp / 'db.sqlite3'}", STATIC_ROOT=str(tmp / "static"),
               PYTHONUNBUFFERED="1")
    log_path = tmp / "run.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(["bash", "scripts/run.sh"], cwd=ROOT, env=env, stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        def serving() -> bool:
            assert process.poll() is None, f"run.sh exited with {process.returncode}:\n{log_path.read_text()}"
            return port_open(port) and requests.get(f"{url}/health/live", timeout=2).status_code == 200
        wait_for(serving, STARTUP_SECONDS, "run.sh to serve")
        out = log_path.read_text()
        assert f"Consensus Tokens is starting on {url}" in out
        assert "sqlite baseline: loaded " in out  # a new SQLite database starts from the recorded baseline
        users = {name: (int(uid), password) for name, uid, password in
                 re.findall(r"^USER (\w+) id=(\d+) tier=\w+ password=(\S+)$", out, re.M)}
        staff = dict(re.findall(r"^STAFF (\w+) password=(\S+)$", out, re.M))
        keys = re.findall(r"^SERVICE_KEY=(\S+)$", out, re.M)
        assert sorted(users) == ["alice", "bob", "carol"] and sorted(staff) == ["admin", "support"] and keys, out
        banner = out[out.index("Consensus Tokens is starting on"):]
        assert f"{url}/admin/" in banner and "STAFF passwords" in banner
        assert ".venv/bin/python manage.py" in banner and "source .venv/bin/activate" in banner
        yield RunSh(url=url, log_path=log_path, users=users, staff=staff, service_key=keys[0])
    finally:
        try:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=15)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=5)


def test_the_api_walk_through(run_sh):
    api, url = run_sh.api(), run_sh.url
    alice, _ = run_sh.users["alice"]
    bob, _ = run_sh.users["bob"]

    before = api.get(f"{url}/api/tokens/usage", params={"userId": alice}).json()
    # the demo users have no way to pay (no Stripe customer): no overage room, cap = limit
    assert (before["tier"], before["limit"], before["cap"], before["used"]) == ("basic", 10_000, 10_000, 4_000)

    # estimate, with every provider the migrations seed
    for provider in SEEDED_PROVIDERS:
        answer = api.post(f"{url}/api/tokens/estimate", json={
            "userId": alice, "operationType": "consensus", "provider": provider,
            "topic": "Is coffee good for you?", "sources": ["Coffee contains caffeine."]})
        assert answer.status_code == 200, (provider, answer.text)
        body = answer.json()
        assert body["provider"] == provider and body["breakdown"]["base"] == 500
        assert body["tokens"] == 500 + body["breakdown"]["content"] and body["breakdown"]["content"] > 0

    # check, holding 1,000 tokens; consume against the hold
    check = api.post(f"{url}/api/tokens/check", json={"userId": alice, "tokens": 1000, "reserve": True,
                                                      "operationId": "op-1"}).json()
    assert check["sufficient"] is True and check["available"] == 10_000 - 4_000 - 1_000 and check["cap"] == 10_000
    consume_body = {"userId": alice, "operationId": "op-1", "tokens": 900, "operationType": "consensus",
                    "reservationId": check["reservationId"]}
    consumed = api.post(f"{url}/api/tokens/consume", json=consume_body)
    assert consumed.status_code == 201, consumed.text
    assert consumed.json()["usage"]["used"] == 4_900 and consumed.json()["usage"]["reserved"] == 0

    # the same request again: the same answer, marked as a replay; the same id with another body: a conflict
    replay = api.post(f"{url}/api/tokens/consume", json=consume_body)
    assert replay.status_code == 200 and replay.headers["Idempotent-Replayed"] == "true"
    assert replay.json() == consumed.json()
    conflict = api.post(f"{url}/api/tokens/consume", json={**consume_body, "tokens": 901})
    assert conflict.status_code == 409 and conflict.json()["error"]["code"] == "operation_id_conflict"

    # past the cap
    refused = api.post(f"{url}/api/tokens/consume", json={"userId": alice, "operationId": "op-big", "tokens": 20_000,
                                                          "operationType": "summary"})
    assert refused.status_code == 402 and refused.json()["error"]["code"] == "token_cap_exceeded"

    # a batch, all or nothing; alice's item takes her past 75% of her plan (an alert e-mail)
    batch = api.post(f"{url}/api/tokens/consume/batch", json={"operations": [
        {"userId": alice, "operationId": "op-2", "tokens": 3000, "operationType": "summary"},
        {"userId": bob, "operationId": "op-2", "tokens": 500, "operationType": "analysis"}]})
    assert batch.status_code == 201, batch.text
    assert batch.json()["recorded"] == 2 and [r["usage"]["used"] for r in batch.json()["results"]] == [7_900, 30_500]

    # hold and release
    hold = api.post(f"{url}/api/tokens/check", json={"userId": alice, "tokens": 500, "reserve": True,
                                                     "operationId": "op-3"}).json()
    released = api.post(f"{url}/api/tokens/release", json={"userId": alice, "reservationId": hold["reservationId"]})
    assert released.status_code == 200
    assert released.json() == {"reservationId": hold["reservationId"], "status": "released", "tokens": 500}

    # the reads
    usage = api.get(f"{url}/api/tokens/usage", params={"userId": alice}).json()
    assert (usage["used"], usage["reserved"], usage["remaining"], usage["status"]) == (7_900, 0, 2_100, "warning")
    history = api.get(f"{url}/api/tokens/history", params={"userId": alice, "kind": "consumption"}).json()
    assert [(e["operationId"], e["tokens"]) for e in history["results"][:2]] == [("op-2", 3000), ("op-1", 900)]
    today = batch.json()["results"][0]["recordedAt"][:10]  # the server's day (UTC)
    daily = api.get(f"{url}/api/tokens/analytics/daily", params={"userId": alice, "from": today, "to": today}).json()
    assert len(daily) == 1 and daily[0]["date"] == today and daily[0]["totalTokens"] >= 3_900
    report = api.get(f"{url}/api/tokens/reports/monthly", params={"userId": alice}).json()
    assert report["month"] == today[:7] and report["totalTokens"] == 7_900  # the demo's period is this month
    assert {"consensus", "summary"} <= {op["operationType"] for op in report["operations"]}

    schema = requests.get(f"{url}/api/schema/", timeout=10)
    assert schema.status_code == 200 and "/api/tokens/consume/batch:" in schema.text

    # SITE_URL follows run.sh's port: the alert e-mail (printed by the console backend) links here
    wait_for(lambda: f"{url}/alerts/unsubscribe/" in run_sh.output(), 10, "the 75% alert e-mail")
    assert "Subject: You have used 75% of your tokens this period" in run_sh.output()


def sign_in(url: str, path: str, username: str, password: str) -> tuple[requests.Session, requests.Response]:
    session = requests.Session()
    session.get(f"{url}{path}", timeout=10).raise_for_status()  # sets the CSRF cookie
    response = session.post(f"{url}{path}", timeout=10, allow_redirects=False, data={
        "username": username, "password": password, "csrfmiddlewaretoken": session.cookies["csrftoken"]})
    return session, response


def test_the_dashboard_sign_in(run_sh):
    url = run_sh.url
    alice, password = run_sh.users["alice"]
    used = run_sh.api().get(f"{url}/api/tokens/usage", params={"userId": alice}).json()["used"]
    session, response = sign_in(url, "/accounts/login/", "alice", password)
    assert response.status_code == 302, response.text
    dashboard = session.get(f"{url}/dashboard/", timeout=10)
    assert dashboard.status_code == 200 and dashboard.url == f"{url}/dashboard/"
    assert f'data-field="used" data-value="{used}"' in dashboard.text
    # a signed-in user reads their own usage without a key
    assert session.get(f"{url}/api/tokens/usage", timeout=10).json()["used"] == used


@pytest.mark.parametrize("name,sees_service_keys", [("support", False), ("admin", True)])
def test_the_admin_sign_in_with_the_staff_logins(run_sh, name, sees_service_keys):
    url = run_sh.url
    session, response = sign_in(url, "/admin/login/?next=/admin/", name, run_sh.staff[name])
    assert response.status_code == 302 and response.headers["Location"] == "/admin/", response.text
    console = session.get(f"{url}/admin/", timeout=10)
    assert console.status_code == 200 and "/admin/logout/" in console.text
    accounts = session.get(f"{url}/admin/metering/account/", timeout=10)
    assert accounts.status_code == 200 and "alice" in accounts.text
    keys = session.get(f"{url}/admin/metering/servicekey/", timeout=10)
    assert keys.status_code == (200 if sees_service_keys else 403)
