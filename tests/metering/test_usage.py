"""GET /api/tokens/usage: exact figures, status boundaries, overage in Decimal."""
from __future__ import annotations

from decimal import Decimal

import pytest

from metering.models import Tier, tier_cap
from metering.services import account_for_user, usage_adjust

pytestmark = pytest.mark.django_db


def usage_after(api, user, used: int) -> dict:
    if used:
        usage_adjust(account=account_for_user(user_id=user.pk), tokens=used, actor="test", reason="set usage")
    response = api.get(f"/api/tokens/usage?userId={user.pk}")
    assert response.status_code == 200, response.content
    return response.json()


@pytest.mark.parametrize("tier,used,status", [
    ("basic", 0, "low"), ("basic", 4_999, "low"), ("basic", 5_000, "moderate"), ("basic", 7_499, "moderate"),
    ("basic", 7_500, "warning"), ("basic", 8_999, "warning"), ("basic", 9_000, "critical"),
    ("basic", 9_999, "critical"), ("basic", 10_000, "exceeded"), ("basic", 15_000, "exceeded"),
    # just under a boundary by less than the 0.01% the percentage is shown with
    ("pro", 24_999, "low"), ("pro", 49_999, "critical"), ("pro", 49_998, "critical"),
    ("enterprise", 149_999, "moderate"),
    ("enterprise", 179_999, "warning"), ("enterprise", 199_999, "critical"), ("enterprise", 200_000, "exceeded"),
])
def test_status_boundaries(api, make_user, tier, used, status):
    body = usage_after(api, make_user(tier), used)
    assert body["status"] == status, body


def test_usage_figures_for_basic(api, make_user):
    user = make_user("basic")
    api.post("/api/tokens/check", {"userId": user.pk, "tokens": 500, "reserve": True}, format="json")
    body = usage_after(api, user, 11_234)
    assert body == {
        "tier": "basic", "limit": 10_000, "used": 11_234, "reserved": 500, "remaining": 0, "available": 3_266,
        "usagePercentage": 112.34, "status": "exceeded", "cap": 15_000,
        "overage": {"tokens": 1_234, "charge": "1.234"},
        "periodStart": body["periodStart"], "periodEnd": body["periodEnd"],
    }
    assert body["periodStart"].endswith("T00:00:00Z") and body["periodStart"][8:10] == "01"


@pytest.mark.parametrize("tier,used,percentage,remaining,overage,charge", [
    ("basic", 0, 0, 10_000, 0, "0"),
    ("basic", 3_333, 33.33, 6_667, 0, "0"),
    ("basic", 10_001, 100.01, 0, 1, "0.001"),
    ("pro", 49_999, 99.99, 1, 0, "0"),  # 99.998 never shows as 100
    ("pro", 50_000, 100, 0, 0, "0"),
    ("pro", 100_000, 200, 0, 50_000, "50"),
    ("enterprise", 201_234, 100.61, 0, 1_234, "0.9872"),  # 100.617: rounded down
    ("enterprise", 600_000, 300, 0, 400_000, "320"),
])
def test_percentage_remaining_and_overage_charge(api, make_user, tier, used, percentage, remaining, overage, charge):
    body = usage_after(api, make_user(tier), used)
    assert body["usagePercentage"] == percentage
    assert body["remaining"] == remaining
    assert body["overage"] == {"tokens": overage, "charge": charge}
    assert isinstance(body["overage"]["charge"], str)
    assert Decimal(charge) == Decimal(overage) * Tier.objects.get(slug=tier).overage_rate


def test_numbers_are_integers(api, make_user):
    body = usage_after(api, make_user("pro"), 12_345)
    for field in ("limit", "used", "reserved", "remaining", "available", "cap"):
        assert type(body[field]) is int, field
    assert type(body["overage"]["tokens"]) is int
    assert isinstance(body["usagePercentage"], (int, float))


@pytest.mark.parametrize("tier,cap", [("basic", 15_000), ("pro", 100_000), ("enterprise", 600_000)])
def test_cap_is_limit_times_one_plus_max_overage(api, make_user, tier, cap):
    assert usage_after(api, make_user(tier), 0)["cap"] == cap


@pytest.mark.parametrize("change", [{"allow_overage": False}, {"hard_limit": True}])
def test_no_overage_means_the_cap_is_the_limit(api, make_user, change):
    Tier.objects.filter(slug="pro").update(**change)
    user = make_user("pro")
    assert usage_after(api, user, 0)["cap"] == 50_000
    refused = api.post("/api/tokens/consume", {"userId": user.pk, "operationId": "o", "tokens": 50_001,
                                               "operationType": "summary"}, format="json")
    assert refused.status_code == 402


@pytest.mark.parametrize("limit,allowed,pct,cap", [(10_000, True, 50, 15_000), (10_000, False, 50, 10_000),
                                                   (333, True, 33, 442), (0, True, 100, 0), (7, True, 0, 7)])
def test_tier_cap_arithmetic(limit, allowed, pct, cap):
    assert tier_cap(limit, allowed, pct) == cap


def test_a_user_without_an_account_gets_the_default_tier(api, django_user_model):
    user = django_user_model.objects.create_user(username="newcomer", password="pw-for-tests-1")
    body = api.get(f"/api/tokens/usage?userId={user.pk}").json()
    assert (body["tier"], body["limit"], body["used"]) == ("basic", 10_000, 0)


def test_check_reports_overage_and_availability(api, make_user):
    user = make_user("basic")
    usage_after(api, user, 9_500)
    check = api.post("/api/tokens/check", {"userId": user.pk, "tokens": 2_000}, format="json").json()
    assert check == {"sufficient": True, "available": 5_500, "overage": 1_500, "cap": 15_000}
    check = api.post("/api/tokens/check", {"userId": user.pk, "tokens": 5_501}, format="json").json()
    assert check["sufficient"] is False and check["available"] == 5_500


@pytest.mark.parametrize("setup", ["plain", "in-overage", "no-tier", "no-account", "period-ended"])
def test_the_one_query_read_and_the_orm_path_answer_alike(api, make_user, settings, setup):
    """GET usage reads account, tier and current period in one prepared statement when they
    exist; the ORM path (which creates what is missing) must answer the same."""
    from contextlib import nullcontext
    from datetime import timedelta

    import time_machine

    from django.utils import timezone

    from metering.models import Account

    user = make_user(None if setup == "no-tier" else "pro")
    if setup == "no-account":
        Account.objects.filter(user=user).delete()
    if setup == "in-overage":
        usage_adjust(account=account_for_user(user_id=user.pk), tokens=61_234, actor="test", reason="overage")
    answers = []
    later = timezone.now() + timedelta(days=40) if setup == "period-ended" else None
    for fast in (True, False):
        settings.METERING_FAST_PATH = fast
        with time_machine.travel(later, tick=False) if later else nullcontext():
            response = api.get(f"/api/tokens/usage?userId={user.pk}")
        assert response.status_code == 200, response.content
        answers.append(response.json())
    assert answers[0] == answers[1]
    if setup == "in-overage":
        assert answers[0]["overage"] == {"tokens": 11_234, "charge": "11.234"}


def test_an_unknown_user_is_404_on_the_one_query_read(api, settings):
    settings.METERING_FAST_PATH = True
    response = api.get("/api/tokens/usage?userId=987654321")
    assert response.status_code == 404 and response.json()["error"]["code"] == "unknown_user"

