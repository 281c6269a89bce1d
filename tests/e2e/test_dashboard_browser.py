"""In a real browser (Chromium, headless) against the live server on PostgreSQL:
a user's dashboard agrees with the API, its chart carries the period's days, the
activity table filters, alert preferences save; support comps the user a tier in
the console (confirmed first) and the user's dashboard shows the new limit at once."""
from __future__ import annotations

from datetime import timedelta
from decimal import Decimal

import pytest
from django.contrib.auth.models import Group
from django.core.management import call_command
from django.utils import timezone

from metering.services import ledger_rollup_refresh
from tests.dashboard.conftest import write_history

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True), pytest.mark.within_one_period]


def sign_in(page, base: str, username: str, password: str = "pw-for-tests-1") -> None:
    page.goto(f"{base}/accounts/login/")
    page.get_by_label("Username").fill(username)
    page.get_by_label("Password").fill(password)
    page.get_by_role("button", name="Sign in").click()


def field(page, name: str) -> str:
    return page.locator(f'[data-field="{name}"]').first.get_attribute("data-value")


def test_user_and_support_journeys(live_server, page, artifacts, make_user, consume, django_user_model):
    base = live_server.url
    alice = make_user("pro", username="alice")
    write_history(alice, days=45, per_day=5, tokens=120)
    ledger_rollup_refresh()
    for i, op in enumerate(["analysis", "consensus", "analysis", "summary", "analysis", "comparison"]):
        consume(alice, 700 + 45 * i, op, *(("anthropic", "claude-sonnet-4") if i % 2 else ()))  # live slice
    call_command("setup_support_group")
    sam = django_user_model.objects.create_user("sam", "sam@example.com", "pw-for-tests-1", is_staff=True)
    sam.groups.add(Group.objects.get(name="support"))

    # --- the user: sign in, the dashboard agrees with the API ---
    page.goto(f"{base}/")
    assert page.url.endswith("/accounts/login/")
    assert page.evaluate("document.activeElement.id") == "id_username"  # the form is ready to type into
    page.screenshot(path=str(artifacts / "login.png"))
    sign_in(page, base, "alice")
    page.wait_for_url(f"{base}/dashboard/")
    page.keyboard.press("Tab")  # keyboard users can jump past the header
    assert page.evaluate("document.activeElement.textContent") == "Skip to content"
    api = page.request.get(f"{base}/api/tokens/usage").json()
    assert api["tier"] == "pro"
    for name, key in [("used", "used"), ("limit", "limit"), ("remaining", "remaining"), ("reserved", "reserved"),
                      ("cap", "cap"), ("percentage", "usagePercentage")]:
        assert field(page, name) == str(api[key]), name
    assert int(field(page, "overage-tokens")) == api["overage"]["tokens"]
    assert Decimal(field(page, "overage-charge")) == Decimal(api["overage"]["charge"])
    assert page.locator('[data-field="status"]').inner_text().lower() == api["status"]
    assert page.locator('[data-field="used"]').inner_text() == f"{api['used']:,}"

    # --- the chart has one bar per day of the period, carrying the analytics figures ---
    start = timezone.datetime.fromisoformat(api["periodStart"].replace("Z", "+00:00")).date()
    end = timezone.datetime.fromisoformat(api["periodEnd"].replace("Z", "+00:00")).date()
    bars = page.locator('svg[data-chart="daily"] rect[data-day]')
    assert bars.count() == (end - start).days
    daily = page.request.get(f"{base}/api/tokens/analytics/daily?from={start}&to={timezone.now().date()}").json()
    assert daily, "history in this period"
    for point in daily:
        bar = page.locator(f'svg[data-chart="daily"] rect[data-day="{point["date"]}"]')
        assert bar.get_attribute("data-tokens") == str(point["totalTokens"])
    assert page.locator("svg[data-chart='daily'] polyline.previous").count() == 1
    page.screenshot(path=str(artifacts / "dashboard.png"), full_page=True)

    # --- filter the activity table ---
    page.get_by_label("Operation type", exact=True).select_option("analysis")
    page.get_by_role("button", name="Filter").click()
    page.wait_for_url("**op=analysis**")
    kinds = page.locator('table[data-table="activity"] tbody tr').evaluate_all(
        "rows => rows.map(r => r.dataset.operationType)")
    assert kinds and set(kinds) == {"analysis"}
    page.get_by_label("From", exact=True).fill(str(timezone.now().date()))
    page.get_by_role("button", name="Filter").click()
    page.wait_for_url("**since=**")
    assert page.locator('table[data-table="activity"] tbody tr').count() == 3  # today's three analyses
    page.get_by_role("link", name="Clear").click()
    assert page.locator('table[data-table="activity"] tbody tr').count() == 25

    # --- change alert preferences ---
    weekly = page.get_by_role("checkbox", name="Weekly digest")
    assert weekly.is_checked()
    weekly.uncheck()
    page.get_by_role("button", name="Save preferences").click()
    page.wait_for_url("**/dashboard/#alerts")
    assert "E-mail preferences saved." in page.locator(".messages").inner_text()
    assert not page.get_by_role("checkbox", name="Weekly digest").is_checked()
    assert page.get_by_role("checkbox", name="Usage alerts").is_checked()
    from alerts.selectors import alert_preferences_get
    assert alert_preferences_get(user=alice).weekly_digest is False

    # a phone-sized view, for the eye
    page.set_viewport_size({"width": 390, "height": 844})
    page.goto(f"{base}/dashboard/")
    page.screenshot(path=str(artifacts / "dashboard-phone.png"), full_page=True)
    page.screenshot(path=str(artifacts / "dashboard-phone-top.png"))
    assert page.evaluate("document.documentElement.scrollWidth") <= 390  # nothing overflows the phone's width
    page.set_viewport_size({"width": 1280, "height": 900})
    page.get_by_role("button", name="Sign out").click()
    page.wait_for_url("**/accounts/login/")

    # --- support: comp alice a tier in the console (she has no subscription: a comp is the only way) ---
    sign_in(page, base, "sam")
    page.goto(f"{base}/admin/")
    assert page.locator('[data-number="tokens-today"]').inner_text() == f"{sum(700 + 45 * i for i in range(6)):,}"
    page.screenshot(path=str(artifacts / "admin-landing.png"), full_page=True)
    page.goto(f"{base}/admin/metering/account/")
    assert "alice" in page.locator("#result_list").inner_text()
    page.screenshot(path=str(artifacts / "admin-accounts.png"))
    page.goto(f"{base}/admin/metering/account/?q=alice")
    page.get_by_role("link", name="alice", exact=True).click()
    page.locator('[data-support-action="comp"]').click()
    page.get_by_label("Tier:", exact=True).select_option(label="Enterprise")
    page.get_by_label("Last day:", exact=True).fill((timezone.now() + timedelta(days=30)).date().isoformat())
    page.get_by_role("button", name="Comp a tier").click()  # no reason: refused
    assert page.locator(".errorlist").first.inner_text() == "This field is required."
    page.get_by_label("Reason:", exact=True).fill("Pilot for the customer's team")
    page.get_by_role("button", name="Comp a tier").click()
    assert "granted without billing" in page.locator('[data-field="confirmation"]').inner_text()
    page.get_by_role("button", name="Confirm: comp a tier").click()
    page.wait_for_url("**/admin/metering/account/*/change/")
    assert "now on Enterprise" in page.locator(".messagelist").inner_text()
    assert page.locator('[data-field="admin-limit"]').inner_text() == "200,000"
    page.screenshot(path=str(artifacts / "admin-account.png"), full_page=True)
    page.screenshot(path=str(artifacts / "admin-account-top.png"))
    page.goto(f"{base}/admin/")
    page.locator("#logout-form button").click()

    # --- the user's dashboard shows the new limit ---
    sign_in(page, base, "alice")
    page.wait_for_url(f"{base}/dashboard/")
    assert field(page, "limit") == "200000"
    assert page.locator('[data-field="limit"]').inner_text() == "200,000"
    assert page.locator('[data-field="tier"]').inner_text() == "Enterprise"
    assert page.request.get(f"{base}/api/tokens/usage").json()["limit"] == 200_000
