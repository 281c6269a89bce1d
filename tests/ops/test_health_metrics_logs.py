"""Health endpoints, the Prometheus endpoint and our counters, structured request
logs with the request id, and the monitor_tokens snapshot — on real PostgreSQL/Redis."""
from __future__ import annotations

import io
import json
import logging

import pytest
from django.core.management import call_command
from django.test import Client
from prometheus_client.parser import text_string_to_metric_families

from consensus_tokens.logging import JsonFormatter, RequestIdFilter, request_id_var
from metering.models import AuditLog

from .conftest import free_port, run_redis

pytestmark = [pytest.mark.django_db, pytest.mark.within_one_period]


def scrape(client=None, **headers) -> dict[tuple[str, tuple], float]:
    response = (client or Client()).get("/metrics", **headers)
    assert response.status_code == 200, response.content
    assert response["Content-Type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(response.content.decode()):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def sample(samples, name, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


# --- health ----------------------------------------------------------------------------------------

def test_live_answers_without_touching_dependencies(settings):
    settings.REDIS_URL = f"redis://127.0.0.1:{free_port()}/0"
    response = Client().get("/health/live")
    assert response.status_code == 200 and response.json() == {"status": "ok"}
    assert "no-cache" in response["Cache-Control"]
    assert Client().head("/health/live").status_code == 200  # load balancers often probe with HEAD
    assert Client().post("/health/live").status_code == 405


def test_ready_checks_database_redis_and_broker(settings):
    with run_redis() as (port, process):
        settings.REDIS_URL = f"redis://127.0.0.1:{port}/0"
        settings.CELERY_TASK_ALWAYS_EAGER = False
        settings.CELERY_BROKER_URL = f"redis://127.0.0.1:{port}/1"
        ok = Client().get("/health/ready")
        assert ok.status_code == 200, ok.content
        body = ok.json()
        assert body["status"] == "ok"
        assert body["checks"] == {"database": "ok", "redis": "ok", "broker": "ok"}

        process.kill()
        process.wait(timeout=5)
        down = Client().get("/health/ready")
    assert down.status_code == 503
    body = down.json()
    assert body["error"]["code"] == "not_ready" and "redis" in body["error"]["message"]
    assert body["checks"] == {"database": "ok", "redis": "failing", "broker": "failing"}
    assert str(port) not in down.content.decode()


def test_ready_says_so_when_tasks_run_in_process(settings):
    settings.CELERY_TASK_ALWAYS_EAGER = True
    body = Client().get("/health/ready").json()
    assert body["checks"]["broker"].startswith("not used")


def test_ready_names_the_failing_check_only_and_logs_the_detail(settings, caplog):
    port = free_port()  # nothing listens there
    settings.REDIS_URL = f"redis://127.0.0.1:{port}/0"
    settings.CELERY_TASK_ALWAYS_EAGER = True
    with caplog.at_level(logging.WARNING, logger="consensus_tokens.health"):
        down = Client().get("/health/ready")
    assert down.status_code == 503
    body = down.json()
    assert body == {"error": {"code": "not_ready", "message": "Not ready: redis failing."}, "status": "unavailable",
                    "checks": {"database": "ok", "redis": "failing", "broker": "not used (tasks run in-process)"}}
    text = down.content.decode()
    assert str(port) not in text and "127.0.0.1" not in text and "Error" not in text
    [record] = [r for r in caplog.records if r.name == "consensus_tokens.health"]
    assert "readiness check redis failed" in record.getMessage() and str(port) in record.getMessage()


# --- metrics ---------------------------------------------------------------------------------------

def test_metrics_count_requests_tokens_and_refusals_by_reason(api, make_user, django_capture_on_commit_callbacks):
    user = make_user("basic")  # cap 15,000
    before = scrape()
    with django_capture_on_commit_callbacks(execute=True):
        ok = api.post("/api/tokens/consume", {"userId": user.pk, "operationId": "m-1", "tokens": 1234,
                                              "operationType": "summary"}, format="json")
    assert ok.status_code == 201
    over = api.post("/api/tokens/consume", {"userId": user.pk, "operationId": "m-2", "tokens": 999_999,
                                            "operationType": "summary"}, format="json")
    assert over.status_code == 402
    bad = api.post("/api/tokens/consume", {"userId": user.pk}, format="json")
    assert bad.status_code == 400
    assert api.post("/api/tokens/check", {"userId": user.pk, "tokens": 100, "reserve": True},
                    format="json").status_code == 200
    after = scrape()

    def delta(name, **labels):
        return sample(after, name, **labels) - sample(before, name, **labels)

    assert delta("ct_tokens_consumed_total") == 1234
    assert delta("ct_token_requests_refused_total", reason="token_cap_exceeded") == 1
    assert delta("ct_token_requests_refused_total", reason="invalid_request") == 1
    assert delta("ct_http_requests_total", method="POST", route="api/tokens/consume", status="201") == 1
    assert delta("ct_http_requests_total", method="POST", route="api/tokens/consume", status="402") == 1
    assert delta("ct_http_request_duration_seconds_count", route="api/tokens/consume") == 3
    # read from the database at scrape time
    assert sample(after, "ct_reservations_open") == 1
    assert sample(after, "ct_reservations_open_tokens") == 100
    for name in ("ct_alerts_sent", "ct_webhooks", "ct_overage_billed_cents", "ct_reservations_expired",
                 "ct_ratelimit_backend_errors"):
        assert f"# TYPE {name}_total counter" in Client().get("/metrics").content.decode()


def test_counter_helpers_other_apps_call(api):
    from consensus_tokens import metrics

    before = scrape()
    metrics.alerts_sent.labels(kind="threshold").inc()
    metrics.overage_billed_cents.inc(250)
    metrics.webhook_processed()
    metrics.webhook_failed()
    metrics.reservations_expired.inc(3)
    after = scrape()
    assert sample(after, "ct_alerts_sent_total", kind="threshold") - sample(before, "ct_alerts_sent_total",
                                                                            kind="threshold") == 1
    assert sample(after, "ct_overage_billed_cents_total") - sample(before, "ct_overage_billed_cents_total") == 250
    assert sample(after, "ct_webhooks_total", result="processed") - sample(
        before, "ct_webhooks_total", result="processed") == 1
    assert sample(after, "ct_webhooks_total", result="failed") - sample(before, "ct_webhooks_total",
                                                                        result="failed") == 1
    assert sample(after, "ct_reservations_expired_total") - sample(before, "ct_reservations_expired_total") == 3


def test_metrics_token_when_configured(settings):
    settings.METRICS_TOKEN = "s3cret-scrape"
    refused = Client().get("/metrics")
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "not_authenticated"
    assert Client().get("/metrics", HTTP_AUTHORIZATION="Bearer wrong").status_code == 401
    scrape(HTTP_AUTHORIZATION="Bearer s3cret-scrape")


def test_metrics_refused_without_a_token_unless_public_on_purpose(settings):
    settings.METRICS_TOKEN = ""
    settings.METRICS_PUBLIC = False  # production's default
    refused = Client().get("/metrics")
    assert refused.status_code == 403 and refused["Content-Type"] == "application/json"
    assert refused.json()["error"]["code"] == "permission_denied" and "ct_" not in refused.content.decode()
    settings.METRICS_PUBLIC = True
    scrape()


# --- logs ------------------------------------------------------------------------------------------

def test_one_json_line_per_request_with_the_request_id(api, make_user, caplog):
    user = make_user("basic")
    formatter = JsonFormatter()
    with caplog.at_level(logging.INFO, logger="consensus_tokens.request"):
        response = api.get(f"/api/tokens/usage?userId={user.pk}", HTTP_X_REQUEST_ID="req-abc.123")
        refused = api.get("/api/tokens/usage?userId=999999999", HTTP_X_REQUEST_ID="req-404")
    assert response["X-Request-ID"] == "req-abc.123"
    lines = [json.loads(formatter.format(r)) for r in caplog.records if r.name == "consensus_tokens.request"]
    assert len(lines) == 2
    first, second = lines
    assert first["request_id"] == "req-abc.123" and first["status"] == 200 and first["method"] == "GET"
    assert first["path"] == "/api/tokens/usage" and first["duration_ms"] >= 0 and first["level"] == "INFO"
    assert first["principal"].startswith("service:") and first["ts"].endswith("Z")
    assert second["request_id"] == "req-404" and second["status"] == 404 and second["error_code"] == "unknown_user"


def test_an_unsafe_request_id_is_replaced_and_lands_on_audit_rows(api, make_user):
    user = make_user("basic")
    response = api.post("/api/tokens/check", {"userId": user.pk, "tokens": 5}, format="json",
                        HTTP_X_REQUEST_ID="bad id\nwith newline")
    assert response.status_code == 200
    rid = response["X-Request-ID"]
    assert rid != "bad id\nwith newline" and len(rid) == 32
    assert AuditLog.objects.get(user=user, action="check").request_id == rid


def test_the_json_formatter_carries_context_extra_fields_and_exceptions():
    record_logger = logging.getLogger("tests.ops.json")
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(RequestIdFilter())
    record_logger.addHandler(handler)
    record_logger.propagate = False
    token = request_id_var.set("rid-42")
    try:
        record_logger.warning("tokens %s", 5, extra={"user_id": 7})
        try:
            raise ValueError("boom")
        except ValueError:
            record_logger.exception("failed")
    finally:
        request_id_var.reset(token)
        record_logger.removeHandler(handler)
    first, second = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert first == {**first, "message": "tokens 5", "level": "WARNING", "request_id": "rid-42", "user_id": 7,
                     "logger": "tests.ops.json"}
    assert second["message"] == "failed" and "ValueError: boom" in second["exc_info"]


# --- monitor_tokens --------------------------------------------------------------------------------

def test_monitor_once_prints_rates_refusals_top_users_and_errors(api, make_user):
    heavy, light = make_user("pro", username="heavy"), make_user("basic", username="light")
    for i in range(3):
        assert api.post("/api/tokens/consume", {"userId": heavy.pk, "operationId": f"h{i}", "tokens": 1000,
                                                "operationType": "summary"}, format="json").status_code == 201
    assert api.post("/api/tokens/consume", {"userId": light.pk, "operationId": "l1", "tokens": 10,
                                            "operationType": "summary"}, format="json").status_code == 201
    assert api.post("/api/tokens/consume", {"userId": light.pk, "operationId": "l2", "tokens": 999_999,
                                            "operationType": "summary"}, format="json").status_code == 402
    out = io.StringIO()
    call_command("monitor_tokens", "--once", "--window", "60", stdout=out)
    text = out.getvalue()
    assert "Operations/s: 0.08" in text  # 5 consume requests in 60 s
    assert "tokens consumed: 3,010" in text
    assert "consume=5" in text
    assert "token_cap_exceeded" in text and "Refusals: 1" in text
    top = text.split("Top users (last hour)")[1].split("Recent errors")[0]
    assert top.index("heavy") < top.index("light") and "3,000" in top
    errors = text.split("Recent errors")[1]
    assert "token_cap_exceeded" in errors and "light" in errors and "l2" in errors


def test_alert_events_are_counted_from_the_database(api, make_user, django_capture_on_commit_callbacks):
    from alerts.models import AlertEvent

    user = make_user("basic")  # limit 10,000: 8,000 crosses the 75% threshold
    with django_capture_on_commit_callbacks(execute=True):
        assert api.post("/api/tokens/consume", {"userId": user.pk, "operationId": "a-1", "tokens": 8000,
                                                "operationType": "summary"}, format="json").status_code == 201
    events = list(AlertEvent.objects.filter(account__user=user).values_list("kind", "status"))
    assert events, "crossing 75% records a threshold alert"
    samples = scrape()
    for kind, status in set(events):
        assert sample(samples, "ct_alert_events_total", kind=kind, status=status) == events.count((kind, status))


def test_overage_billed_is_read_from_the_invoice_items(make_user):
    from decimal import Decimal

    from billing.models import BillingAccount, OverageInvoice
    from metering.services import account_for_user, period_current

    account = account_for_user(user_id=make_user("basic").pk)
    billing = BillingAccount.objects.create(account=account, stripe_customer_id="cus_metrics")
    period = period_current(account=account)
    for through, amount, state in ((1000, 100, "paid"), (3000, 200, "created"), (3500, 50, "created")):
        OverageInvoice.objects.create(period=period, billing_account=billing, through_tokens=through, tokens=500,
                                      rate=Decimal("0.001"), amount_cents=amount, state=state,
                                      idempotency_key=f"metrics-{through}")
    samples = scrape()
    assert sample(samples, "ct_overage_invoiced_cents_total", state="created") == 250
    assert sample(samples, "ct_overage_invoiced_cents_total", state="paid") == 100
    assert sample(samples, "ct_overage_invoice_items_total", state="created") == 2


def test_monitor_refreshes_until_interrupted():
    import os
    import signal
    import subprocess
    import sys
    import threading
    import time

    from .conftest import ROOT, database_url

    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "consensus_tokens.settings.test", "DATABASE_URL": database_url()}
    process = subprocess.Popen([sys.executable, "manage.py", "monitor_tokens", "--interval", "0.3"], cwd=ROOT, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen: list[str] = []
    reader = threading.Thread(target=lambda: seen.extend(iter(lambda: process.stdout.read(1), "")), daemon=True)
    reader.start()
    deadline = time.monotonic() + 30
    while "".join(seen).count("\x1b[2J") < 3 and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.1)
    process.send_signal(signal.SIGINT)
    err = process.stderr.read()
    process.wait(timeout=20)
    reader.join(timeout=5)
    out = "".join(seen)
    assert process.returncode == 0, err
    frames = out.split("\x1b[2J\x1b[H")[1:]
    assert len(frames) >= 3, out  # it redrew the screen
    assert all("Operations/s:" in frame and "Top users (last hour)" in frame for frame in frames)
    assert "Traceback" not in err
