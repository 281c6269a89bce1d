"""Money rules through a subscription's whole life, against the fake Stripe's HTTP edge and
signed webhooks: a yearly plan's monthly allowances and monthly overage invoices, switches
between monthly and yearly, and the one policy for accounts that cannot pay."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone as dt_timezone

import pytest
import time_machine
from django.utils import timezone

from billing.models import BillingAccount, OverageInvoice
from billing.services import add_months, customer_ensure
from billing.tasks import overage_bill_ended_periods_task, subscriptions_expire_task
from metering.models import Account, LedgerEntry, UsagePeriod

from .conftest import consume, deliver_all, e2e, price_id, subscribe

pytestmark = [e2e, pytest.mark.within_one_period]



def _next_january_31() -> datetime:
    """A start on the 31st, after the suite clock's now: the months of its year are clamped
    (Feb 28 or 29, Apr 30, ...), as Stripe's are."""
    return datetime(timezone.now().year + 1, 1, 31, 9, 30, tzinfo=dt_timezone.utc)


def _periods(user) -> list[UsagePeriod]:
    return list(UsagePeriod.objects.filter(account__user=user).order_by("starts_at"))


def _current(user) -> UsagePeriod:
    return UsagePeriod.objects.filter(account__user=user, starts_at__lte=timezone.now(),
                                      ends_at__gt=timezone.now()).get()


def _own_invoice_calls(fake, key: str) -> tuple[list, list, list]:
    return ([c for c in fake.calls_to("POST", r"/v1/invoiceitems") if c.idempotency_key == key],
            [c for c in fake.calls_to("POST", r"/v1/invoices") if c.idempotency_key == f"{key}-invoice"],
            [c for c in fake.calls_to("POST", r"/v1/invoices/[^/]+/finalize") if c.idempotency_key == f"{key}-finalize"])


def test_a_yearly_plan_has_twelve_monthly_allowances_each_months_overage_invoiced_once(site, client, make_user,
                                                                                       api):
    fake = site
    user = make_user("basic", can_pay=False)
    year_start = _next_january_31()
    with time_machine.travel(year_start, tick=True):
        sub_id = subscribe(fake, client, user, "pro", "year", start=int(year_start.timestamp()))
    year_end = datetime.fromtimestamp(fake.get("subscription", sub_id)["items"]["data"][0]["current_period_end"],
                                      tz=dt_timezone.utc)
    assert year_end == year_start.replace(year=year_start.year + 1)
    billing = BillingAccount.objects.get(account__user=user)
    assert billing.interval == "year" and Account.objects.get(user=user).can_pay

    for month in range(12):
        month_start, month_end = add_months(year_start, month), min(add_months(year_start, month + 1), year_end)
        with time_machine.travel(month_start + timedelta(days=3), tick=True):
            # 51,000 of a 50,000 allowance: 1,000 overage tokens at $0.001 = 100 cents
            assert consume(api, user, 51_000, f"y-{month}").status_code == 201
            period = _current(user)
            assert (period.starts_at, period.ends_at) == (month_start, month_end), month
            assert (period.token_limit, period.cap, period.used) == (50_000, 100_000, 51_000)
            usage = api.get(f"/api/tokens/usage?userId={user.pk}").json()
            assert usage["periodEnd"] == month_end.isoformat().replace("+00:00", "Z") and usage["limit"] == 50_000
        with time_machine.travel(month_end + timedelta(minutes=20), tick=True):
            overage_bill_ended_periods_task.delay()
            overage_bill_ended_periods_task.delay()  # a second run bills nothing more
            key = f"ct-overage-{period.pk}-1000"
            items, invoices, finalized = _own_invoice_calls(fake, key)
            assert (len(items), len(invoices), len(finalized)) == (1, 1, 1), month
            # the month's own invoice: not attached to the subscription, whose renewal is a year away
            assert "subscription" not in items[0].params and items[0].params["amount"] == "100"
            row = OverageInvoice.objects.get(period=period)
            assert (row.tokens, row.amount_cents, row.state) == (1000, 100, "created")
            invoice = fake.get("invoice", row.stripe_invoice_id)
            assert invoice["status"] == "open" and invoice["amount_due"] == 100

    # Stripe charges the months' invoices; a paid one marks its overage paid.
    first = OverageInvoice.objects.order_by("period__starts_at").first()
    deliver_all(fake, fake.invoice_pay(first.stripe_invoice_id))
    first.refresh_from_db()
    assert first.state == "paid"

    # Month 13: the renewal starts the next year; its first month has a full allowance again.
    with time_machine.travel(year_end + timedelta(hours=1), tick=True):
        deliver_all(fake, fake.subscription_renew(sub_id, start=int(year_end.timestamp())))
        assert consume(api, user, 50_000, "y-12").status_code == 201
        period = _current(user)
        assert (period.starts_at, period.ends_at) == (year_end, add_months(year_end, 1))
        assert (period.used, period.token_limit) == (50_000, 50_000)
    periods = _periods(user)
    assert len(periods) == 13
    assert all(a.ends_at == b.starts_at for a, b in zip(periods, periods[1:]))  # contiguous
    assert sum(p.used for p in periods) == 12 * 51_000 + 50_000
    assert OverageInvoice.objects.filter(period__account__user=user).count() == 12
    assert len(fake.all("invoiceitem")) == 12


def test_monthly_to_yearly_and_back_keep_periods_contiguous_and_bill_each_overage_once(site, client, make_user, api):
    fake = site
    user = make_user("basic", can_pay=False)
    sub_id = subscribe(fake, client, user, "pro", "month")
    monthly = _current(user)
    assert consume(api, user, 52_000, "m-1").status_code == 201  # 2,000 overage tokens

    deliver_all(fake, fake.subscription_change_price(sub_id, price_id(fake, "pro_yearly")))
    switched = int(fake.get("subscription", sub_id)["items"]["data"][0]["current_period_start"])
    monthly.refresh_from_db()
    yearly_month = _current(user)
    assert int(monthly.ends_at.timestamp()) == switched and monthly.closed_at is not None
    assert yearly_month.starts_at == monthly.ends_at and yearly_month.used == 0
    assert yearly_month.ends_at == add_months(yearly_month.starts_at, 1)  # a month, not the year
    assert BillingAccount.objects.get(account__user=user).interval == "year"
    # the monthly period's overage is invoiced at once: no monthly renewal will carry it now
    (row,) = OverageInvoice.objects.filter(period=monthly)
    assert (row.tokens, row.amount_cents) == (2_000, 200) and row.stripe_invoice_id
    assert consume(api, user, 1_000, "y-1").status_code == 201

    with time_machine.travel(timezone.now() + timedelta(days=40), tick=True):
        assert consume(api, user, 60_000, "y-2").status_code == 201  # the second month of the year
        second = _current(user)
        assert second.starts_at == yearly_month.ends_at and second.used == 60_000
        deliver_all(fake, fake.subscription_change_price(sub_id, price_id(fake, "pro_monthly")))
        second.refresh_from_db()
        back = _current(user)
        assert back.starts_at == second.ends_at and back.used == 0
        assert BillingAccount.objects.get(account__user=user).interval == "month"
        (row,) = OverageInvoice.objects.filter(period=second)
        assert (row.tokens, row.amount_cents) == (10_000, 1000) and row.stripe_invoice_id
        overage_bill_ended_periods_task.delay()

    periods = _periods(user)
    assert all(a.ends_at == b.starts_at for a, b in zip(periods, periods[1:]))
    assert sum(p.used for p in periods) == 52_000 + 1_000 + 60_000
    assert sum(LedgerEntry.objects.filter(account__user=user).values_list("used_delta", flat=True)) == 113_000
    assert OverageInvoice.objects.filter(period__account__user=user).count() == 2
    assert len(fake.all("invoiceitem")) == 2


def test_upgrading_mid_year_applies_to_the_current_month_and_the_months_after(site, client, make_user, api):
    fake = site
    user = make_user("basic", can_pay=False)
    year_start = _next_january_31()
    with time_machine.travel(year_start, tick=True):
        sub_id = subscribe(fake, client, user, "pro", "year", start=int(year_start.timestamp()))
    with time_machine.travel(add_months(year_start, 4) + timedelta(days=2), tick=True):
        assert consume(api, user, 40_000, "u-1").status_code == 201
        month = _current(user)
        deliver_all(fake, fake.subscription_change_price(sub_id, price_id(fake, "enterprise_yearly")))
        upgraded = _current(user)
        assert upgraded.pk == month.pk and upgraded.used == 40_000
        assert (upgraded.token_limit, upgraded.cap) == (200_000, 600_000)
    with time_machine.travel(add_months(year_start, 5) + timedelta(days=2), tick=True):
        assert consume(api, user, 1, "u-2").status_code == 201
        nxt = _current(user)
        assert nxt.starts_at == add_months(year_start, 5) and (nxt.token_limit, nxt.cap) == (200_000, 600_000)


def test_a_new_and_a_canceled_account_follow_the_same_policy_without_overage(site, settings, client, make_user,
                                                                            django_user_model, api):
    settings.DEFAULT_TIER = "basic"
    fake = site
    newcomer = django_user_model.objects.create_user("newcomer", "newcomer@example.com", "pw-for-tests-1")
    leaver = make_user("basic", can_pay=False)
    sub_id = subscribe(fake, client, leaver, "pro")
    deliver_all(fake, fake.subscription_cancel(sub_id))
    with time_machine.travel(timezone.now() + timedelta(days=10, hours=1), tick=True):
        subscriptions_expire_task.delay()
        for user in (newcomer, leaver):
            usage = api.get(f"/api/tokens/usage?userId={user.pk}").json()
            assert (usage["tier"], usage["limit"], usage["cap"]) == ("basic", 10_000, 10_000), user
            assert consume(api, user, 10_000, "p-1").status_code == 201
            refused = consume(api, user, 1, "p-2")
            assert refused.status_code == 402 and refused.json()["error"]["code"] == "token_cap_exceeded"
        assert not Account.objects.get(user=leaver).can_pay and not Account.objects.get(user=newcomer).can_pay

    settings.DEFAULT_TIER = None  # the other documented policy: nothing for nobody's money
    other_new = django_user_model.objects.create_user("other", "other@example.com", "pw-for-tests-1")
    other_leaver = make_user("basic", can_pay=False)
    sub_id = subscribe(fake, client, other_leaver, "pro")
    deliver_all(fake, fake.subscription_cancel(sub_id))
    with time_machine.travel(timezone.now() + timedelta(days=10, hours=1), tick=True):
        subscriptions_expire_task.delay()
        for user in (other_new, other_leaver):
            assert consume(api, user, 1, "q-1").status_code == 402, user
            assert Account.objects.get(user=user).tier is None


def test_no_overage_without_a_way_to_pay_until_a_card_is_saved_then_invoiced_at_month_end(site, client, make_user,
                                                                                         api):
    fake = site
    user = make_user("basic", can_pay=False)
    assert consume(api, user, 10_000, "n-1").status_code == 201
    assert consume(api, user, 1, "n-2").status_code == 402  # cap = limit: nothing we could not invoice
    overage_bill_ended_periods_task.delay()
    assert not fake.all("invoiceitem")

    billing = customer_ensure(user=user)
    deliver_all(fake, [fake.customer_payment_method(billing.stripe_customer_id)])
    period = _current(user)
    assert Account.objects.get(user=user).can_pay and (period.token_limit, period.cap) == (10_000, 15_000)
    assert consume(api, user, 2_500, "n-3").status_code == 201  # 2,500 overage tokens = 250 cents

    with time_machine.travel(period.ends_at + timedelta(minutes=5), tick=True):
        overage_bill_ended_periods_task.delay()
        (item,) = fake.all("invoiceitem")
        assert item["amount"] == 250 and item["customer"] == billing.stripe_customer_id and item["invoice"]
        assert fake.get("invoice", item["invoice"])["status"] == "open"

    # The card removed: overage room goes, tokens already used stay.
    deliver_all(fake, [fake.customer_payment_method(billing.stripe_customer_id, saved=False)])
    assert not Account.objects.get(user=user).can_pay


def test_the_stripe_cli_local_loop_is_accepted_with_its_own_secret(settings, live_server, stripe_on, client,
                                                                    make_user):
    """`stripe listen --forward-to <url>` signs with the CLI's secret: with STRIPE_WEBHOOK_SECRET
    set, setup_stripe registers our endpoint locally with it (Stripe cannot reach localhost)."""
    import json
    import urllib.error
    import urllib.request
    from io import StringIO

    from django.core.management import call_command

    fake = stripe_on
    settings.SITE_URL = live_server.url
    settings.STRIPE_WEBHOOK_SECRET = "whsec_cli_0123456789abcdef"
    out = StringIO()
    call_command("setup_stripe", stdout=out)
    call_command("setup_stripe", stdout=StringIO())  # a second run changes nothing
    assert "stripe listen --forward-to " + live_server.url + "/stripe/webhook/" in out.getvalue()
    assert not fake.all("webhook_endpoint") and not fake.calls_to("POST", r"/v1/webhook_endpoints")
    url = out.getvalue().split("--forward-to ")[1].split()[0]

    user = make_user("basic", can_pay=False)
    billing = customer_ensure(user=user)
    event = fake.customer_payment_method(billing.stripe_customer_id)

    def post(secret: str) -> int:
        payload = json.dumps(event)
        request = urllib.request.Request(url, data=payload.encode(), method="POST", headers={
            "Content-Type": "application/json", "Stripe-Signature": fake.sign(payload, secret)})
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status
        except urllib.error.HTTPError as exc:
            return exc.code

    assert post("whsec_someone_else") == 400
    assert not Account.objects.get(user=user).can_pay
    assert post(settings.STRIPE_WEBHOOK_SECRET) == 200
    assert Account.objects.get(user=user).can_pay
