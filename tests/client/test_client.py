"""The Python client against a live server: typed answers, the operation context manager, the
API's errors as exceptions, and retries that never record twice."""
from __future__ import annotations

import time
import uuid
from datetime import datetime, timedelta, timezone
from decimal import Decimal

import pytest

from consensus_tokens_client import (AuthenticationFailed, Client, ConnectionFailed, InvalidRequest, OperationClosed,
                                     OperationIdConflict, RateLimited, RetryPolicy, TokenCapExceeded, UnknownUser)
from metering.models import LedgerEntry, Reservation, ServiceKey
from metering.services import reconcile, service_key_create, usage_get

from .conftest import FAST_RETRIES
from .proxy import gateway_answer

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.within_one_period]

CONSUME = "/api/tokens/consume"


def consumptions(operation_id: str) -> list[LedgerEntry]:
    return list(LedgerEntry.objects.filter(kind=LedgerEntry.Kind.CONSUMPTION, operation_id=operation_id))


def test_answers_are_typed_with_decimal_money_and_aware_times(client, make_user):
    user = make_user("basic")
    estimate = client.estimate(user_id=user.pk, operation_type="summary", topic="How many tokens is this sentence?")
    assert estimate.tokens == estimate.base_tokens + estimate.content_tokens and estimate.base_tokens == 100
    assert estimate.method == "exact" and estimate.provider == "openai"

    check = client.check(user_id=user.pk, tokens=500)
    assert check.sufficient and check.available == 15_000 and check.cap == 15_000  # overage room included

    for n in range(5):
        client.consume(user_id=user.pk, tokens=2_100, operation_type="summary", operation_id=f"typed-{n}")
    usage = client.usage(user_id=user.pk)
    assert usage.used == 10_500 and usage.overage.tokens == 500
    assert usage.overage.charge == Decimal("0.5") and isinstance(usage.overage.charge, Decimal)
    assert usage.period_start.tzinfo is not None and usage.period_start.utcoffset() == timedelta(0)
    assert usage.period_start <= datetime.now(timezone.utc) < usage.period_end

    # history follows its cursor pages: five consumptions at two a page, newest first
    entries = list(client.history(user_id=user.pk, kind="consumption", page_size=2))
    assert [e.operation_id for e in entries] == [f"typed-{n}" for n in range(4, -1, -1)]
    assert all(e.tokens == 2_100 and e.created_at.tzinfo is not None for e in entries)

    today = datetime.now(timezone.utc).date()
    days = client.analytics_daily(user_id=user.pk, since=today, until=today)
    assert [(d.date, d.total_tokens, d.request_count) for d in days] == [(today, 10_500, 5)]
    report = client.report_monthly(user_id=user.pk, month=today)
    assert report.month == f"{today.year:04d}-{today.month:02d}" and report.total_tokens == 10_500
    assert report.avg_tokens_per_request == Decimal("2100") and report.operations[0].operation_type == "summary"


def test_operation_settles_against_its_hold_exactly_once(client, make_user):
    user = make_user("pro")
    with client.operation(user_id=user.pk, operation_type="consensus", provider="openai", model="gpt-4o",
                          estimate=1_200) as op:
        held = Reservation.objects.get(pk=op.reservation.reservation_id)
        assert held.status == "held" and held.tokens == 1_200 and usage_get(user_id=user.pk).reserved == 1_200
        consumption = op.settle(1_350)
        with pytest.raises(OperationClosed):
            op.settle(1_350)

    assert consumption.tokens == 1_350 and not consumption.replayed and consumption.operation_id == op.operation_id
    [entry] = consumptions(op.operation_id)
    assert (entry.used_delta, entry.estimated_tokens, entry.provider, entry.model) == (1_350, 1_200, "openai", "gpt-4o")
    held.refresh_from_db()
    assert held.status == "settled"
    usage = usage_get(user_id=user.pk)
    assert (usage.used, usage.reserved) == (1_350, 0)


def test_an_exception_in_the_block_releases_the_hold(client, make_user):
    user = make_user("basic")
    with pytest.raises(RuntimeError, match="the model timed out"):
        with client.operation(user_id=user.pk, operation_type="summary", estimate=800) as op:
            raise RuntimeError("the model timed out")
    assert Reservation.objects.get(pk=op.reservation.reservation_id).status == "released"
    assert op.released is not None and op.released.tokens == 800
    usage = usage_get(user_id=user.pk)
    assert (usage.used, usage.reserved) == (0, 0) and not consumptions(op.operation_id)


def test_leaving_the_block_without_settle_releases_the_hold(client, make_user):
    user = make_user("basic")
    with client.operation(user_id=user.pk, operation_type="summary", estimate=800) as op:
        pass
    assert Reservation.objects.get(pk=op.reservation.reservation_id).status == "released"
    assert usage_get(user_id=user.pk).reserved == 0

    with client.operation(user_id=user.pk, operation_type="summary", estimate=800) as zero:
        assert zero.settle(0) is None  # nothing used: the hold is released, nothing consumed
    assert Reservation.objects.get(pk=zero.reservation.reservation_id).status == "released"
    assert not LedgerEntry.objects.filter(kind="consumption").exists()


def test_no_room_for_the_estimate_raises_token_cap_exceeded_before_the_block(client, make_user):
    user = make_user("basic", can_pay=False)  # no overage room: cap = limit = 10,000
    client.consume(user_id=user.pk, tokens=9_500, operation_type="summary")
    ran = []
    with pytest.raises(TokenCapExceeded) as refused:
        with client.operation(user_id=user.pk, operation_type="consensus", estimate=600):
            ran.append(True)
    assert not ran
    assert (refused.value.available, refused.value.cap) == (500, 10_000)
    assert not Reservation.objects.filter(account__user=user).exists()

    with pytest.raises(TokenCapExceeded) as past_cap:  # the consume endpoint's own 402
        client.consume(user_id=user.pk, tokens=600, operation_type="summary")
    assert past_cap.value.status == 402 and (past_cap.value.available, past_cap.value.cap) == (500, 10_000)
    assert past_cap.value.request_id and past_cap.value.code == "token_cap_exceeded"


def test_api_errors_are_exceptions_named_after_their_codes(client, server, make_user, proxy):
    user = make_user("basic")
    client.consume(user_id=user.pk, tokens=10, operation_type="summary", operation_id="reused")
    with pytest.raises(OperationIdConflict) as conflict:
        client.consume(user_id=user.pk, tokens=11, operation_type="summary", operation_id="reused")
    assert conflict.value.status == 409
    with pytest.raises(UnknownUser):
        client.consume(user_id=user.pk + 10_000, tokens=10, operation_type="summary")
    with Client(proxy.url, "ct_test_not-a-key", retry=FAST_RETRIES) as stranger:
        with pytest.raises(AuthenticationFailed) as denied:
            stranger.usage(user_id=user.pk)
    assert denied.value.status == 401
    with Client(proxy.url, client._http.headers["Authorization"].split()[1], retry=FAST_RETRIES) as proxied:
        with pytest.raises(InvalidRequest) as invalid:
            proxied.consume(user_id=user.pk, tokens=0, operation_type="summary")
    assert "tokens" in invalid.value.fields
    assert proxy.seen[CONSUME] == 1, "a 400 is never retried"


def test_a_consume_whose_answer_is_lost_is_retried_and_recorded_once(proxy, service_key, make_user):
    user = make_user("basic")
    proxy.fault(CONSUME, "lose_answer")  # the server records it; the connection drops on the way back
    with Client(proxy.url, service_key, retry=FAST_RETRIES) as client:
        consumption = client.consume(user_id=user.pk, tokens=321, operation_type="summary")
    assert proxy.seen[CONSUME] == 2
    assert consumption.replayed and consumption.tokens == 321  # the retry found it recorded
    assert len(consumptions(consumption.operation_id)) == 1
    assert usage_get(user_id=user.pk).used == 321


def test_a_consume_lost_on_its_way_is_retried_and_recorded_once(proxy, service_key, make_user):
    user = make_user("basic")
    proxy.fault(CONSUME, "lose_request")
    with Client(proxy.url, service_key, retry=FAST_RETRIES) as client:
        consumption = client.consume(user_id=user.pk, tokens=55, operation_type="summary")
    assert proxy.seen[CONSUME] == 2 and not consumption.replayed
    assert len(consumptions(consumption.operation_id)) == 1 and usage_get(user_id=user.pk).used == 55


def test_a_settle_whose_answer_is_lost_settles_the_hold_once(proxy, service_key, make_user):
    user = make_user("pro")
    proxy.fault(CONSUME, "lose_answer")
    with Client(proxy.url, service_key, retry=FAST_RETRIES) as client:
        with client.operation(user_id=user.pk, operation_type="analysis", estimate=400) as op:
            consumption = op.settle(380)
    assert consumption.replayed and len(consumptions(op.operation_id)) == 1
    assert Reservation.objects.get(pk=op.reservation.reservation_id).status == "settled"
    usage = usage_get(user_id=user.pk)
    assert (usage.used, usage.reserved) == (380, 0)


def test_a_server_rate_limit_raises_rate_limited_with_retry_after(proxy, make_user):
    user = make_user("basic")
    key, raw = service_key_create(name="two an hour", scope=ServiceKey.Scope.CONSUME)
    ServiceKey.objects.filter(pk=key.pk).update(requests_per_hour=2)
    with Client(proxy.url, raw, retry=FAST_RETRIES) as client:
        client.consume(user_id=user.pk, tokens=1, operation_type="summary")
        client.consume(user_id=user.pk, tokens=1, operation_type="summary")
        with pytest.raises(RateLimited) as limited:
            client.consume(user_id=user.pk, tokens=1, operation_type="summary")
    # the window reopens within the hour: longer than the client waits (max_retry_after 5 s), so
    # it is not retried but raised with the server's Retry-After
    assert limited.value.status == 429 and 5 < limited.value.retry_after <= 3_600
    assert proxy.seen[CONSUME] == 3
    assert usage_get(user_id=user.pk).used == 2


def test_a_short_retry_after_is_waited_for_then_the_request_goes_again(proxy, service_key, make_user):
    user = make_user("basic")
    proxy.fault(CONSUME, "answer", raw_answer=gateway_answer(429, "Too Many Requests", retry_after="1"))
    proxy.fault(CONSUME, "answer", raw_answer=gateway_answer(503, "Service Unavailable", retry_after="1"))
    with Client(proxy.url, service_key, retry=FAST_RETRIES) as client:
        started = time.monotonic()
        consumption = client.consume(user_id=user.pk, tokens=9, operation_type="summary")
        waited = time.monotonic() - started
    assert waited >= 2.0, "each Retry-After of 1 s was honoured"
    assert proxy.seen[CONSUME] == 3 and not consumption.replayed
    assert len(consumptions(consumption.operation_id)) == 1


def test_no_server_raises_connection_failed_after_the_retries():
    policy = RetryPolicy(attempts=3, backoff=0.01, max_backoff=0.02)
    with Client("http://127.0.0.1:9", "ct_test_key", retry=policy, timeout=1) as client:
        with pytest.raises(ConnectionFailed, match="after 3 attempt"):
            client.consume(user_id=1, tokens=1, operation_type="summary")


def test_the_ledger_reconciles_after_the_client_s_retries(proxy, service_key, make_user):
    users = [make_user("pro") for _ in range(3)]
    proxy.fault(CONSUME, "lose_answer", times=3)
    with Client(proxy.url, service_key, retry=FAST_RETRIES) as client:
        for n, user in enumerate(users * 3):
            client.consume(user_id=user.pk, tokens=100 + n, operation_type="summary",
                           operation_id=f"rec-{uuid.uuid4().hex}")
    assert LedgerEntry.objects.filter(kind="consumption").count() == 9
    assert not reconcile(), reconcile().summary()


def test_a_hold_and_its_release_whose_answers_are_lost_happen_once(proxy, service_key, make_user):
    user = make_user("basic")
    proxy.fault("/api/tokens/check", "lose_answer")  # the hold is placed; the client never hears of it
    proxy.fault("/api/tokens/release", "lose_answer")
    with Client(proxy.url, service_key, retry=FAST_RETRIES) as client:
        with client.operation(user_id=user.pk, operation_type="summary", estimate=700) as op:
            pass  # leaving without settle releases
    assert proxy.seen["/api/tokens/check"] == 2 and proxy.seen["/api/tokens/release"] == 2
    [hold] = Reservation.objects.filter(account__user=user)  # the retried reserve found the first hold
    assert hold.pk == op.reservation.reservation_id and hold.status == "released"
    assert op.released is not None and op.released.status == "released"
    assert usage_get(user_id=user.pk).reserved == 0 and not reconcile()


def test_an_operation_given_the_estimate_teaches_the_calibration_its_script(client, make_user):
    user = make_user("pro")
    estimate = client.estimate(user_id=user.pk, operation_type="summary", provider="anthropic",
                               topic="Сколько токенов в этом предложении на русском языке?")
    assert (estimate.method, estimate.script_class, estimate.calibration_samples) == ("calibrated", "cyrillic", 0)
    with client.operation(user_id=user.pk, operation_type="summary", provider="anthropic",
                          model="claude-sonnet-4", estimate=estimate) as op:
        op.settle(estimate.tokens + 25)
    assert op.reservation.tokens == estimate.tokens
    [entry] = consumptions(op.operation_id)
    assert (entry.estimated_tokens, entry.script_class, entry.provider) == (estimate.tokens, "cyrillic", "anthropic")
