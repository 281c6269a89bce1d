"""Overage invoicing: rounding once per period, the crash between Stripe's answer
and our commit, early billing past a threshold."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone as dt_timezone
from decimal import Decimal

import psycopg
import pytest
from django.db import DatabaseError, connection

from consensus_tokens.errors import ApplicationError

from billing.models import OverageInvoice
from billing.services import add_months, overage_cents
from billing.services.common import usage_month
from billing.tasks import overage_bill_ended_periods_task, overage_bill_thresholds_task, overage_invoice_period_task
from metering.models import Tier, UsagePeriod

from .conftest import consume, e2e, subscribe

pytestmark = pytest.mark.within_one_period  # slow steps or processes of their own: start clear of a month's end


@pytest.mark.parametrize("tokens,rate,cents", [
    (0, "0.001", 0), (4, "0.001", 0), (5, "0.001", 1), (1235, "0.001", 124), (1234, "0.001", 123),
    (3333, "0.0008", 267), (625, "0.0008", 50), (1, "0.005", 1), (10_000_000, "0.000123", 123_000),
])
def test_overage_cents_is_half_up_in_decimal(tokens, rate, cents):
    assert overage_cents(tokens, Decimal(rate)) == cents


def test_add_months_clamps_to_the_end_of_the_month():
    utc = dt_timezone.utc
    assert add_months(datetime(2026, 1, 31, 10, tzinfo=utc), 1) == datetime(2026, 2, 28, 10, tzinfo=utc)
    assert add_months(datetime(2028, 1, 31, tzinfo=utc), 1) == datetime(2028, 2, 29, tzinfo=utc)
    assert add_months(datetime(2026, 11, 15, tzinfo=utc), 2) == datetime(2027, 1, 15, tzinfo=utc)
    assert add_months(datetime(2026, 3, 1, tzinfo=utc), 12) == datetime(2027, 3, 1, tzinfo=utc)


def test_a_yearly_billing_period_is_cut_into_months_a_monthly_one_never_is():
    utc = dt_timezone.utc
    start = datetime(2028, 1, 31, 9, tzinfo=utc)
    year_end = datetime(2029, 1, 31, 9, tzinfo=utc)
    assert usage_month(start=start, end=year_end, interval="year", now=datetime(2028, 2, 29, 8, tzinfo=utc)) == (
        start, datetime(2028, 2, 29, 9, tzinfo=utc))
    assert usage_month(start=start, end=year_end, interval="year", now=datetime(2028, 3, 31, 9, tzinfo=utc)) == (
        datetime(2028, 3, 31, 9, tzinfo=utc), datetime(2028, 4, 30, 9, tzinfo=utc))
    assert usage_month(start=start, end=year_end, interval="year", now=datetime(2029, 1, 30, tzinfo=utc)) == (
        datetime(2028, 12, 31, 9, tzinfo=utc), year_end)
    # a monthly period is one usage period whatever its length (here 30 days from Feb 29, past Mar 29)
    feb29 = datetime(2028, 2, 29, 23, 59, tzinfo=utc)
    thirty_days = feb29 + timedelta(days=30)
    assert usage_month(start=feb29, end=thirty_days, interval="month", now=feb29 + timedelta(days=29, hours=1)) == (
        feb29, thirty_days)


def _kill_backend_on_invoice_item(fake, pid, dsn):
    """After Stripe has decided its answer (the item exists) and before our process
    hears it, our database connection dies: the commit that records the item fails."""
    def hook(call, status, body):
        if call.method == "POST" and call.path == "/v1/invoiceitems" and not call.replayed:
            with psycopg.connect(**dsn, autocommit=True) as admin:
                admin.execute("select pg_terminate_backend(%s)", [pid])
    fake.before_answer.append(hook)
    return hook


@e2e
def test_crash_between_stripe_answer_and_commit_resumes_without_double_billing(site, client, make_user, api,
                                                                              admin_client):
    fake = site
    user = make_user("basic")
    subscribe(fake, client, user, "pro")
    assert consume(api, user, 51_500, "x-1").status_code == 201
    period = UsagePeriod.objects.filter(account__user=user).latest("starts_at")

    with connection.cursor() as cursor:
        cursor.execute("select pg_backend_pid()")
        pid = cursor.fetchone()[0]
    params = connection.get_connection_params()
    dsn = {k: params[k] for k in ("host", "port", "user", "dbname") if params.get(k)}
    hook = _kill_backend_on_invoice_item(fake, pid, dsn)
    with pytest.raises(DatabaseError):
        overage_invoice_period_task.delay(period.pk, "upcoming_invoice")
    fake.before_answer.remove(hook)
    connection.close()

    assert len(fake.all("invoiceitem")) == 1  # Stripe made it...
    row = OverageInvoice.objects.get()
    assert row.state == "started" and row.stripe_invoice_item_id == ""  # ...but we never recorded it

    # Staff see it in admin and retry it; Stripe answers with the item it already made.
    listing = admin_client.get("/admin/billing/overageinvoice/")
    assert listing.status_code == 200 and b"started" in listing.content.lower()
    response = admin_client.post("/admin/billing/overageinvoice/", {"action": "retry", "_selected_action": [row.pk]})
    assert response.status_code == 302
    overage_bill_ended_periods_task.delay()  # the periodic job (which would have resumed it) finds nothing to do
    row.refresh_from_db()
    items = fake.all("invoiceitem")
    assert len(items) == 1 and items[0]["amount"] == 150
    assert row.state == "created" and row.stripe_invoice_item_id == items[0]["id"] and row.amount_cents == 150
    posts = fake.calls_to("POST", r"/v1/invoiceitems")
    assert [c.replayed for c in posts] == [False, True]
    assert {c.idempotency_key for c in posts} == {f"ct-overage-{period.pk}-1500"}


@e2e
def test_later_usage_is_billed_as_the_rest_of_one_rounding(site, client, make_user, api):
    """An item for the upcoming invoice, then more overage before the period ends: the
    second item is round(total) - first, so the period is still rounded once."""
    fake = site
    user = make_user("basic")
    subscribe(fake, client, user, "pro")
    period = UsagePeriod.objects.filter(account__user=user).latest("starts_at")
    assert consume(api, user, 50_004, "r-1").status_code == 201
    overage_invoice_period_task.delay(period.pk, "upcoming_invoice")  # 4 x $0.001 = 0.4 cents: nothing yet
    assert fake.all("invoiceitem") == [] and not OverageInvoice.objects.exists()
    assert consume(api, user, 741, "r-2").status_code == 201
    overage_invoice_period_task.delay(period.pk, "upcoming_invoice")  # 745 tokens: 74.5 -> 75 cents
    assert consume(api, user, 490, "r-3").status_code == 201
    overage_invoice_period_task.delay(period.pk, "period_end")  # 1,235 tokens: 123.5 -> 124 cents in all: 49 more
    overage_invoice_period_task.delay(period.pk, "period_end")
    assert sorted(i["amount"] for i in fake.all("invoiceitem")) == [49, 75]
    assert list(OverageInvoice.objects.order_by("through_tokens").values_list("through_tokens", "tokens",
                                                                              "amount_cents")) == [
        (745, 745, 75), (1235, 490, 49)]


@e2e
def test_large_overage_is_billed_early_past_the_tier_threshold(site, client, make_user, api):
    fake = site
    Tier.objects.filter(slug="pro").update(overage_billing_threshold_cents=1000)  # $10
    user = make_user("basic")
    subscribe(fake, client, user, "pro")
    assert consume(api, user, 55_000, "t-1").status_code == 201  # $5 accrued: under the threshold
    overage_bill_thresholds_task.delay()
    assert fake.all("invoiceitem") == []
    assert consume(api, user, 6_000, "t-2").status_code == 201  # $11
    overage_bill_thresholds_task.delay()
    overage_bill_thresholds_task.delay()
    items = fake.all("invoiceitem")
    assert [i["amount"] for i in items] == [1100]
    row = OverageInvoice.objects.get()
    assert row.reason == "threshold" and row.stripe_invoice_id  # invoiced now, not at renewal
    invoice = fake.get("invoice", row.stripe_invoice_id)
    assert [line["parent"]["invoice_item_details"]["invoice_item"] for line in invoice["lines"]["data"]] == [
        items[0]["id"]]
    assert fake.calls_to("POST", r"/v1/invoices")[0].idempotency_key == f"{row.idempotency_key}-invoice"


@e2e
def test_the_periodic_job_resumes_an_unfinished_item_by_itself(site, client, make_user, api):
    fake = site
    user = make_user("basic")
    subscribe(fake, client, user, "pro")
    assert consume(api, user, 50_010, "y-1").status_code == 201
    period = UsagePeriod.objects.filter(account__user=user).latest("starts_at")
    fake.fail_next = [("POST", r"/v1/invoiceitems", 503)] * 5  # Stripe down: no answer at all
    with pytest.raises(ApplicationError):
        overage_invoice_period_task.delay(period.pk, "upcoming_invoice")
    fake.fail_next = []
    row = OverageInvoice.objects.get()
    assert row.state == "started" and "Stripe" in row.last_error and fake.all("invoiceitem") == []
    overage_bill_ended_periods_task.delay()
    row.refresh_from_db()
    assert row.state == "created" and [i["amount"] for i in fake.all("invoiceitem")] == [1]
