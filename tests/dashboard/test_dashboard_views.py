"""The dashboard pages, through Django's test client on real PostgreSQL."""
from __future__ import annotations

import csv
import io
import re
from decimal import Decimal

import pytest
from django.test import Client
from django.utils import timezone

from metering.models import LedgerEntry
from metering.services import ledger_rollup_refresh, usage_grant

from .conftest import write_history


def _field(html: str, name: str) -> str:
    match = re.search(rf'data-field="{name}"[^>]*data-value="([^"]*)"', html)
    assert match, name
    return match.group(1)


@pytest.fixture
def signed_in(make_user):
    def make(tier="pro"):
        user = make_user(tier)
        client = Client()
        client.force_login(user)
        return user, client
    return make


@pytest.mark.django_db
def test_root_sends_signed_in_users_to_the_dashboard_and_others_to_sign_in(signed_in):
    assert Client().get("/").url == "/accounts/login/"
    assert Client().get("/dashboard/").url.startswith("/accounts/login/?next=/dashboard/")
    _, client = signed_in()
    assert client.get("/").url == "/dashboard/"


@pytest.mark.django_db
def test_dashboard_shows_the_same_figures_as_the_usage_api(signed_in, consume):
    user, client = signed_in("basic")
    consume(user, 9_000, "analysis")
    consume(user, 1_234, "summary", provider="anthropic", model="claude-sonnet-4")  # past the 10,000 limit
    html = client.get("/dashboard/").content.decode()
    api = client.get("/api/tokens/usage").json()
    for field, key in [("used", "used"), ("limit", "limit"), ("remaining", "remaining"), ("reserved", "reserved"),
                       ("cap", "cap"), ("percentage", "usagePercentage")]:
        assert str(api[key]) == _field(html, field), field
    assert api["overage"]["tokens"] == int(_field(html, "overage-tokens")) == 234
    assert Decimal(api["overage"]["charge"]) == Decimal(_field(html, "overage-charge")) == Decimal("0.234")
    assert 'data-field="status">Exceeded' in html and api["status"] == "exceeded"
    assert "10,234" in html and "$0.23" in html
    assert 'data-table="operation"' in html and ">analysis<" in html and "anthropic / claude-sonnet-4" in html


@pytest.mark.django_db
def test_chart_has_a_bar_for_each_day_of_the_period_and_the_previous_period_line(signed_in):
    user, client = signed_in()
    write_history(user, days=75, tokens=11)
    ledger_rollup_refresh()
    html = client.get("/dashboard/").content.decode()
    now = timezone.now()
    period_days = len(re.findall(r'<rect [^>]*data-day="', html))
    first = now.replace(day=1)
    nxt = (first.replace(month=first.month % 12 + 1, year=first.year + (first.month == 12)))
    assert period_days == (nxt.date() - first.date()).days
    today_bar = re.search(rf'data-day="{now.date():%Y-%m-%d}" data-tokens="(\d+)"', html)
    assert today_bar.group(1) == "0"  # history stops yesterday
    if now.day > 1:
        yesterday = (now - timezone.timedelta(days=1)).date()
        assert re.search(rf'data-day="{yesterday:%Y-%m-%d}" data-tokens="11"', html)
    assert '<polyline class="previous"' in html


@pytest.mark.django_db
def test_activity_filters_by_operation_type_and_date_and_pages_by_cursor(signed_in, consume):
    user, client = signed_in()
    for i in range(30):
        consume(user, 10 + i, "analysis" if i % 3 else "consensus")
    html = client.get("/dashboard/?op=consensus#activity").content.decode()
    rows = re.findall(r'<tr data-operation-type="(\w*)"', html)
    assert rows and set(rows) == {"consensus"} and len(rows) == 10
    first_page = client.get("/dashboard/").content.decode()
    assert len(re.findall(r'<tr data-operation-type=', first_page)) == 25
    cursor = re.search(r'cursor=([\w-]+)#activity', first_page).group(1)
    second = client.get(f"/dashboard/?cursor={cursor}").content.decode()
    assert len(re.findall(r'<tr data-operation-type=', second)) == 5
    tomorrow = (timezone.now() + timezone.timedelta(days=1)).date()
    none = client.get(f"/dashboard/?since={tomorrow}").content.decode()
    assert "No activity matches these filters" in none
    bad = client.get("/dashboard/?since=2026-02-30&op=nope&cursor=!!").content
    assert b"Enter a valid date" in bad and b"Select a valid choice" in bad


@pytest.mark.django_db
def test_past_periods_can_be_browsed_and_exported(signed_in):
    user, client = signed_in()
    write_history(user, days=70, tokens=5)
    periods = list(user.token_account.periods.order_by("starts_at"))
    old = periods[0]
    html = client.get(f"/dashboard/?period={old.pk}").content.decode()
    assert "Past period" in html and _field(html, "used") == str(old.used)
    response = client.get(f"/dashboard/export.csv?period={old.pk}")
    rows = list(csv.reader(io.StringIO(b"".join(response.streaming_content).decode())))
    assert rows[0][:3] == ["created_at", "kind", "tokens"]
    assert len(rows) - 1 == LedgerEntry.objects.filter(period=old).count()
    everything = b"".join(client.get("/dashboard/export.csv").streaming_content).decode()
    assert len(everything.strip().splitlines()) == 71


@pytest.mark.django_db
def test_export_neutralises_formulas_and_shows_only_the_users_own_rows(signed_in, make_user):
    user, client = signed_in()
    other = make_user()
    usage_grant(account=user.token_account, tokens=10, reason="=HYPERLINK(\"x\")", actor="support")
    usage_grant(account=other.token_account, tokens=10, reason="not yours", actor="support")
    text = b"".join(client.get("/dashboard/export.csv").streaming_content).decode()
    assert "'=HYPERLINK" in text and "not yours" not in text
    # another user's period id shows the user's own current period instead
    other_period = other.token_account.periods.first() or None
    if other_period:
        assert "Past period" not in client.get(f"/dashboard/?period={other_period.pk}").content.decode()


@pytest.mark.django_db
def test_alert_preferences_are_saved_and_audited(signed_in):
    from alerts.selectors import alert_preferences_get
    from metering.models import AuditLog

    user, client = signed_in()
    response = client.post("/dashboard/alerts", {"usage_alerts": "on"})
    assert response.status_code == 302 and response.url.endswith("#alerts")
    prefs = alert_preferences_get(user=user)
    assert prefs.usage_alerts and not prefs.weekly_digest and not prefs.period_summary
    assert AuditLog.objects.filter(user=user, action="alert_preferences").exists()
    html = client.get("/dashboard/").content.decode()
    assert 'name="usage_alerts" value="on" checked' in html and 'name="weekly_digest" value="on">' in html
    assert Client().post("/dashboard/alerts", {}).status_code == 302  # to sign-in, nothing changed


@pytest.mark.django_db
def test_plan_card_posts_to_billing_checkout_and_portal_with_csrf(signed_in):
    user, client = signed_in("basic")
    html = client.get("/dashboard/").content.decode()
    assert 'action="/billing/checkout"' in html and 'name="tier"' in html and 'value="pro"' in html
    assert 'name="interval" value="year"' in html and "csrfmiddlewaretoken" in html


@pytest.mark.django_db
def test_login_logout_and_password_reset_pages(make_user):
    from django.core import mail

    user = make_user(username="dana")
    client = Client()
    page = client.get("/accounts/login/").content.decode()
    assert '<label for="id_username">' in page and "Forgot your password?" in page
    response = client.post("/accounts/login/", {"username": "dana", "password": "pw-for-tests-1"})
    assert response.url == "/dashboard/"
    assert client.post("/accounts/logout/").url == "/accounts/login/"
    assert client.get("/dashboard/").status_code == 302
    client.post("/accounts/password_reset/", {"email": user.email})
    assert len(mail.outbox) == 1 and "/accounts/reset/" in mail.outbox[0].body
    link = re.search(r"(/accounts/reset/\S+)", mail.outbox[0].body).group(1)
    form_page = client.get(link, follow=True)
    assert b"Choose a new password" in form_page.content
    done = client.post(form_page.redirect_chain[-1][0], {"new_password1": "a-new-Pass-99", "new_password2": "a-new-Pass-99"})
    assert done.status_code == 302
    assert client.login(username="dana", password="a-new-Pass-99")


@pytest.mark.django_db
@pytest.mark.parametrize("query", [
    "period=99999999999999999999999", "period=%C2%B2", "period=-1", "period=%00", "cursor=" + "A" * 300,
    "cursor=OTk5OS0xMi0zMVQwMDowMDowMHw5OTk5OTk5OTk5OTk5OTk5OTk5OTk5", "since=9999-12-31", "until=9999-12-31",
    "since=0001-01-01", "op=%00&since=%00", "since=2026-02-30", "op=" + "x" * 5000,
])
def test_odd_query_strings_never_break_the_dashboard(signed_in, query):
    user, client = signed_in()
    assert client.get(f"/dashboard/?{query}").status_code == 200
    assert client.get(f"/dashboard/export.csv?{query}").status_code == 200


@pytest.mark.django_db
@pytest.mark.parametrize("query", ["to=9999-12-31", "from=9999-12-30&to=9999-12-31", "from=0001-01-01&to=0001-01-02",
                                   "from=%C2%B2", "to=2026-02-29"])
def test_out_of_range_dates_are_a_400_not_a_500(signed_in, query):
    user, client = signed_in()
    response = client.get(f"/api/tokens/analytics/daily?{query}")
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_request"


@pytest.mark.django_db
def test_plan_card_shows_billing_state_and_the_portal_button_for_a_customer(signed_in):
    from billing.models import BillingAccount
    from metering.models import Tier

    user, client = signed_in("pro")
    html = client.get("/dashboard/").content.decode()
    assert 'action="/billing/portal"' not in html and 'data-field="billing-status">Active<' in html
    BillingAccount.objects.create(account=user.token_account, stripe_customer_id="cus_X1", subscription_status="past_due",
                                  cancel_at_period_end=True, pending_tier=Tier.objects.get(slug="basic"))
    html = client.get("/dashboard/").content.decode()
    assert 'action="/billing/portal"' in html and 'data-field="billing-status">Past due<' in html
    assert "Changes to Basic at the end of this billing period." in html
    assert "Your subscription ends with this billing period." in html


@pytest.mark.django_db
def test_plan_card_shows_the_months_true_allowance_next_reset_and_overage_room(signed_in, make_user):
    """A yearly subscriber sees the monthly allowance and the month's end as the next reset, not
    the year's; an account that cannot pay sees that it has no overage room."""
    from datetime import timedelta

    from billing.models import BillingAccount
    from billing.services import add_months

    user, client = signed_in("pro")
    year_start = timezone.now() - timedelta(days=40)
    BillingAccount.objects.create(account=user.token_account, stripe_customer_id="cus_Y1", subscription_status="active",
                                  stripe_subscription_id="sub_Y1", interval="year", current_period_start=year_start,
                                  current_period_end=add_months(year_start, 12))
    html = client.get("/dashboard/").content.decode()
    month_end = add_months(year_start, 2)  # the year's second month holds now (40 days in)
    allowance = re.search(r'data-field="allowance">([^<]*)<', html).group(1)
    assert allowance == f"50,000 tokens a month (billed yearly), next reset {month_end:%b %-d, %Y %H:%M} UTC"
    assert re.search(r'data-field="overage-room">Overage up to 50,000 tokens past the allowance', html)

    payless = make_user("basic", can_pay=False)
    client.force_login(payless)
    html = client.get("/dashboard/").content.decode()
    assert "No overage without a payment method: usage stops at the allowance" in html
