"""Billing periods, tier changes and what support staff do to an account."""
from __future__ import annotations

from datetime import datetime, timezone as dt_timezone
from decimal import Decimal

import pytest
import time_machine
from django.contrib.auth import get_user_model

from consensus_tokens.errors import ApplicationError
from metering.models import Account, AuditLog, LedgerEntry, Reservation, Tier, UsagePeriod
from metering.services import (
    account_change_tier,
    account_for_user,
    ledger_reconcile,
    period_align,
    period_reset,
    reconcile,
    usage_adjust,
    usage_grant,
)

from .conftest import consume_body, current_period

pytestmark = pytest.mark.django_db


def utc(*args) -> datetime:
    return datetime(*args, tzinfo=dt_timezone.utc)


def usage(api, user) -> dict:
    response = api.get(f"/api/tokens/usage?userId={user.pk}")
    assert response.status_code == 200, response.content
    return response.json()


@pytest.mark.parametrize("fast_path", [True, False], ids=["fast", "orm"])
@pytest.mark.parametrize("last_moment,first_moment,next_end", [
    (utc(2026, 11, 30, 23, 59, 59, 999999), utc(2026, 12, 1), "2027-01-01T00:00:00Z"),
    (utc(2026, 12, 31, 23, 59, 59), utc(2027, 1, 1, 0, 0, 1), "2027-02-01T00:00:00Z"),
])
def test_a_request_after_the_period_end_opens_the_next_one(api, make_user, settings, fast_path, last_moment,
                                                           first_moment, next_end):
    settings.METERING_FAST_PATH = fast_path
    user = make_user("basic")
    with time_machine.travel(last_moment, tick=False):
        assert api.post("/api/tokens/consume", consume_body(user, "old-1", 14_900), format="json").status_code == 201
        refused = api.post("/api/tokens/consume", consume_body(user, "new-1", 500), format="json")
        assert refused.status_code == 402
    with time_machine.travel(first_moment, tick=False):
        response = api.post("/api/tokens/consume", consume_body(user, "new-1", 500), format="json")
        assert response.status_code == 201, response.content
        assert response.json()["usage"]["used"] == 500
        now = usage(api, user)
    assert (now["used"], now["status"]) == (500, "low")
    assert now["periodStart"] == first_moment.strftime("%Y-%m-01T00:00:00Z") and now["periodEnd"] == next_end
    old, new = UsagePeriod.objects.filter(account__user=user).order_by("starts_at")
    assert (old.used, new.used) == (14_900, 500)
    assert old.ends_at == new.starts_at
    assert LedgerEntry.objects.get(operation_id="new-1").period_id == new.pk
    assert ledger_reconcile() == []


def hold_in_november(api, user) -> dict:
    """An 800-token hold placed ten minutes before November 2026 ends, live until 00:05 on December 1."""
    with time_machine.travel(utc(2026, 11, 30, 23, 50), tick=False):
        return api.post("/api/tokens/check", {"userId": user.pk, "tokens": 800, "reserve": True},
                        format="json").json()


def test_a_hold_from_the_old_period_is_freed_there_and_charged_in_the_new(api, make_user):
    user = make_user("basic")
    hold = hold_in_november(api, user)
    with time_machine.travel(utc(2026, 12, 1, 0, 1), tick=False):
        response = api.post("/api/tokens/consume", consume_body(user, "across", 750,
                                                                reservationId=hold["reservationId"]), format="json")
        assert response.status_code == 201, response.content
    old, new = UsagePeriod.objects.filter(account__user=user).order_by("starts_at")
    assert (old.used, old.reserved) == (0, 0)
    assert (new.used, new.reserved) == (750, 0)
    assert ledger_reconcile() == []


def test_a_hold_from_the_old_period_is_charged_in_the_new_only_within_its_cap(api, make_user, spend):
    """Refused, the settlement changes nothing: the release in the old period rolls back with
    the rest and the hold stays held until settled within the cap (or released, or expired)."""
    user = make_user("basic")  # cap 15,000
    hold = hold_in_november(api, user)
    with time_machine.travel(utc(2026, 12, 1, 0, 1), tick=False):
        spend(user, 14_500)
        body = consume_body(user, "across", 750, reservationId=hold["reservationId"])
        refused = api.post("/api/tokens/consume", body, format="json")
        assert refused.status_code == 402, refused.content
        assert (refused.json()["error"]["available"], refused.json()["error"]["cap"]) == (500, 15_000)
        old, new = UsagePeriod.objects.filter(account__user=user).order_by("starts_at")
        assert (old.used, old.reserved, new.used, new.reserved) == (0, 800, 14_500, 0)
        assert Reservation.objects.get(pk=hold["reservationId"]).status == "held"
        assert not LedgerEntry.objects.filter(kind="release").exists()
        settled = api.post("/api/tokens/consume", {**body, "tokens": 500}, format="json")
        assert settled.status_code == 201, settled.content
    old, new = UsagePeriod.objects.filter(account__user=user).order_by("starts_at")
    assert (old.used, old.reserved, new.used, new.reserved) == (0, 0, 15_000, 0)
    assert Reservation.objects.get(pk=hold["reservationId"]).status == "settled"
    assert ledger_reconcile() == [] and not reconcile()


def test_a_batch_settles_a_hold_from_the_old_period_in_the_new(api, make_user):
    user = make_user("basic")
    hold = hold_in_november(api, user)
    with time_machine.travel(utc(2026, 12, 1, 0, 1), tick=False):
        response = api.post("/api/tokens/consume/batch", {"operations": [
            consume_body(user, "plain", 100), consume_body(user, "across", 900, reservationId=hold["reservationId"])]},
            format="json")
        assert response.status_code == 201, response.content
    old, new = UsagePeriod.objects.filter(account__user=user).order_by("starts_at")
    assert (old.used, old.reserved, new.used, new.reserved) == (0, 0, 1_000, 0)
    entry = LedgerEntry.objects.get(operation_id="across", kind="consumption")
    assert (entry.period_id, entry.reserved_delta, str(entry.reservation_id)) == (new.pk, 0, hold["reservationId"])
    release = LedgerEntry.objects.get(kind="release")
    assert (release.period_id, release.reserved_delta, release.reason) == (old.pk, -800, "settled")
    assert ledger_reconcile() == [] and not reconcile()


@pytest.fixture
def staff_account(make_user):
    user = make_user("basic")
    return account_for_user(user_id=user.pk)


def test_changing_tier_applies_at_once(api, staff_account, spend):
    user = staff_account.user
    spend(user, 14_000)
    assert api.post("/api/tokens/consume", consume_body(user, "big", 5_000), format="json").status_code == 402
    account_change_tier(account=staff_account, tier=Tier.objects.get(slug="pro"), actor="support", reason="upsell")
    now = usage(api, user)
    assert (now["tier"], now["limit"], now["cap"], now["status"]) == ("pro", 50_000, 100_000, "low")
    assert api.post("/api/tokens/consume", consume_body(user, "big", 5_000), format="json").status_code == 201
    account_change_tier(account=staff_account, tier=Tier.objects.get(slug="basic"), actor="support",
                        reason="downgrade")
    now = usage(api, user)
    # the lower cap cannot take back the 19,000 granted under the old one: it stops further use
    assert (now["limit"], now["cap"], now["used"], now["status"]) == (10_000, 19_000, 19_000, "exceeded")
    assert api.post("/api/tokens/consume", consume_body(user, "more", 1), format="json").status_code == 402
    row = AuditLog.objects.get(action="change_tier", detail__reason="downgrade")
    assert (row.actor, row.detail["from"], row.detail["to"]) == ("support", "pro", "basic")


@pytest.mark.parametrize("reason", ["", "   "])
def test_staff_actions_need_a_reason(staff_account, reason):
    pro = Tier.objects.get(slug="pro")
    for action in (lambda: account_change_tier(account=staff_account, tier=pro, actor="s", reason=reason),
                   lambda: usage_grant(account=staff_account, tokens=10, actor="s", reason=reason),
                   lambda: usage_adjust(account=staff_account, tokens=10, actor="s", reason=reason),
                   lambda: period_reset(account=staff_account, actor="s", reason=reason)):
        with pytest.raises(ApplicationError) as refused:
            action()
        assert refused.value.code == "reason_required"
    assert not LedgerEntry.objects.exists()
    assert Account.objects.get(pk=staff_account.pk).tier.slug == "basic"


def test_editing_a_tier_in_admin_applies_to_open_periods_at_once(api, make_user, client):
    held_user = make_user("basic")
    user = make_user("basic")
    Account.objects.filter(user=held_user).update(billing_hold=True)
    usage(api, user), usage(api, held_user)  # open their periods on the old terms
    admin = get_user_model().objects.create_superuser("boss", "boss@example.com", "pw-for-tests-1")
    client.force_login(admin)
    tier = Tier.objects.get(slug="basic")
    url = f"/admin/metering/tier/{tier.pk}/change/"
    form = client.get(url).context["adminform"].form
    data = {name: form[name].value() for name in form.fields if form[name].value() is not None}
    data.update(monthly_token_limit=20_000, overage_rate="0.002", max_overage_percentage=25)
    response = client.post(url, data)
    assert response.status_code == 302, response.context["adminform"].form.errors if response.context else ""
    now = usage(api, user)
    assert (now["limit"], now["cap"]) == (20_000, 25_000)
    held = usage(api, held_user)
    assert (held["limit"], held["cap"]) == (20_000, 20_000)  # a hold keeps the account to its limit
    assert current_period(user).overage_rate == Decimal("0.002")
    assert AuditLog.objects.filter(action="tier_change", actor="boss").exists()


def test_hard_limit_tier_caps_at_the_limit(api, make_user):
    Tier.objects.filter(slug="pro").update(hard_limit=True)
    user = make_user("pro")
    assert usage(api, user)["cap"] == 50_000


def test_grant_adjust_and_reset_write_ledger_rows(api, staff_account, spend):
    user = staff_account.user
    spend(user, 6_000)
    grant = usage_grant(account=staff_account, tokens=1_000, actor="ann", reason="apology")
    assert (grant.kind, grant.used_delta, grant.actor, grant.reason) == ("grant", -1_000, "ann", "apology")
    assert usage(api, user)["used"] == 5_000
    adjust = usage_adjust(account=staff_account, tokens=-2_000, actor="ann", reason="double count")
    assert (adjust.kind, adjust.used_delta) == ("adjustment", -2_000)
    assert usage(api, user)["used"] == 3_000
    with pytest.raises(ApplicationError):
        usage_adjust(account=staff_account, tokens=-3_001, actor="ann", reason="too far")
    with pytest.raises(ApplicationError):
        usage_adjust(account=staff_account, tokens=0, actor="ann", reason="nothing")
    cap = current_period(user).cap
    with pytest.raises(ApplicationError) as past_cap:  # a correction upwards stays under the cap too
        usage_adjust(account=staff_account, tokens=cap - 3_000 + 1, actor="ann", reason="late report")
    assert past_cap.value.code == "token_cap_exceeded" and usage(api, user)["used"] == 3_000
    with pytest.raises(ApplicationError):
        usage_grant(account=staff_account, tokens=-5, actor="ann", reason="negative grant")
    hold = api.post("/api/tokens/check", {"userId": user.pk, "tokens": 400, "reserve": True}, format="json").json()
    period = period_reset(account=staff_account, actor="ann", reason="new contract")
    assert (period.used, period.reserved) == (0, 400)  # holds stay held
    reset = LedgerEntry.objects.get(kind="reset")
    assert (reset.used_delta, reset.actor, reset.reason) == (-3_000, "ann", "new contract")
    kinds = list(LedgerEntry.objects.filter(account=staff_account).order_by("id").values_list("kind", flat=True))
    assert kinds == ["consumption", "grant", "adjustment", "reservation", "reset"]  # history stays
    assert sorted(AuditLog.objects.filter(actor="ann").values_list("action", flat=True)) == [
        "adjustment", "grant", "reset"]
    assert api.post("/api/tokens/release", {"userId": user.pk, "reservationId": hold["reservationId"]},
                    format="json").status_code == 200
    assert ledger_reconcile() == []


def test_a_grant_leaves_more_room_than_the_limit(api, staff_account):
    usage_grant(account=staff_account, tokens=2_000, actor="ann", reason="bonus")
    now = usage(api, staff_account.user)
    assert (now["used"], now["remaining"], now["usagePercentage"], now["status"]) == (-2_000, 12_000, 0, "low")
    user = staff_account.user
    assert api.post("/api/tokens/consume", consume_body(user, "a", 15_000), format="json").status_code == 201
    assert api.post("/api/tokens/consume", consume_body(user, "b", 2_000), format="json").status_code == 201
    assert api.post("/api/tokens/consume", consume_body(user, "c", 1), format="json").status_code == 402


def test_period_align_keeps_history_and_starts_at_zero(api, staff_account, spend):
    user = staff_account.user
    with time_machine.travel(utc(2026, 11, 10, 12), tick=False):
        spend(user, 4_000)
        calendar = current_period(user)
        start, end = utc(2026, 11, 15, 8), utc(2026, 12, 15, 8)
        aligned = period_align(account=staff_account, starts_at=start, ends_at=end)
        assert (aligned.starts_at, aligned.ends_at, aligned.used) == (start, end, 0)
        calendar.refresh_from_db()
        assert (calendar.ends_at, calendar.used) == (start, 4_000) and calendar.closed_at is not None
        assert current_period(user).pk == calendar.pk  # until the new period starts
    with time_machine.travel(utc(2026, 11, 20), tick=False):
        assert current_period(user).pk == aligned.pk
        assert api.post("/api/tokens/consume", consume_body(user, "after", 10), format="json").status_code == 201
        # aligning again to the same start keeps the period and follows Stripe's end
        again = period_align(account=staff_account, starts_at=start, ends_at=utc(2026, 12, 16))
        assert again.pk == aligned.pk and again.used == 10 and again.ends_at == utc(2026, 12, 16)
        assert usage(api, user)["periodEnd"] == "2026-12-16T00:00:00Z"
    assert UsagePeriod.objects.filter(account=staff_account).count() == 2
    assert ledger_reconcile() == []


def test_period_align_adopts_a_calendar_period_opened_before_a_late_webhook(api, staff_account, spend):
    """Stripe's period began Oct 28; the webhook arrives Nov 3, after a request
    already opened the November calendar period. That period becomes Stripe's,
    keeping its usage, and no two periods overlap."""
    user = staff_account.user
    with time_machine.travel(utc(2026, 10, 20), tick=False):
        spend(user, 1_000)
        october = current_period(user)
    with time_machine.travel(utc(2026, 11, 2), tick=False):
        spend(user, 300)
        november = current_period(user)
    with time_machine.travel(utc(2026, 11, 3), tick=False):
        start, end = utc(2026, 10, 28), utc(2026, 11, 28)
        aligned = period_align(account=staff_account, starts_at=start, ends_at=end)
        assert aligned.pk == november.pk and (aligned.starts_at, aligned.ends_at, aligned.used) == (start, end, 300)
        october.refresh_from_db()
        assert (october.ends_at, october.used) == (start, 1_000)
        assert current_period(user).pk == november.pk
        assert usage(api, user)["periodStart"] == "2026-10-28T00:00:00Z"
    periods = list(UsagePeriod.objects.filter(account=staff_account).order_by("starts_at"))
    assert all(a.ends_at <= b.starts_at for a, b in zip(periods, periods[1:]))
    assert ledger_reconcile() == []


@pytest.mark.parametrize("fast_path", [True, False], ids=["fast", "orm"])
def test_a_replay_in_the_next_period_charges_nothing(api, make_user, settings, fast_path):
    settings.METERING_FAST_PATH = fast_path
    user = make_user("basic")
    body = consume_body(user, "month-end-op", 700)
    with time_machine.travel(utc(2026, 11, 30, 23, 59), tick=False):
        first = api.post("/api/tokens/consume", body, format="json")
    with time_machine.travel(utc(2026, 12, 1, 0, 5), tick=False):
        again = api.post("/api/tokens/consume", body, format="json")
        assert again.status_code == 200 and again.json() == first.json()
        conflict = api.post("/api/tokens/consume", {**body, "tokens": 701}, format="json")
        assert conflict.status_code == 409
        assert usage(api, user)["used"] == 0
    assert list(UsagePeriod.objects.filter(account__user=user).order_by("starts_at").values_list("used", flat=True)) \
        in ([700], [700, 0])
    assert ledger_reconcile() == []
