"""AsyncClient against a live server: the same calls awaited, `async with` operations, `async for`
over history, the async recorder, and a lost answer retried once. Each test drives its own event
loop (asyncio.run); the database is read outside it."""
from __future__ import annotations

import asyncio

import pytest

from consensus_tokens_client import AsyncClient, TokenCapExceeded
from metering.models import LedgerEntry, Reservation
from metering.services import reconcile, usage_get

from .conftest import FAST_RETRIES

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.within_one_period]


def test_async_operation_settles_and_releases_on_exception(server, service_key, make_user):
    user = make_user("pro")

    async def scenario():
        async with AsyncClient(server.url, service_key, retry=FAST_RETRIES) as client:
            estimate = await client.estimate(user_id=user.pk, operation_type="analysis", topic="Compare two answers.")
            async with client.operation(user_id=user.pk, operation_type="analysis", estimate=estimate.tokens) as op:
                settled = await op.settle(estimate.tokens + 40)
            failed = client.operation(user_id=user.pk, operation_type="analysis", estimate=500)
            with pytest.raises(ValueError):
                async with failed:
                    raise ValueError("the model refused")
            history = [entry async for entry in client.history(user_id=user.pk, page_size=1)]
            usage = await client.usage(user_id=user.pk)
            return estimate, op, settled, failed, history, usage

    estimate, op, settled, failed, history, usage = asyncio.run(scenario())
    assert settled.tokens == estimate.tokens + 40 and not settled.replayed
    assert Reservation.objects.get(pk=op.reservation.reservation_id).status == "settled"
    assert Reservation.objects.get(pk=failed.reservation.reservation_id).status == "released"
    # newest first, one a page: the release, the second hold, the consumption, the first hold
    assert [e.kind for e in history] == ["release", "reservation", "consumption", "reservation"]
    assert (usage.used, usage.reserved) == (estimate.tokens + 40, 0)


def test_async_no_room_raises_before_the_block(server, service_key, make_user):
    user = make_user("basic", can_pay=False)

    async def scenario():
        async with AsyncClient(server.url, service_key, retry=FAST_RETRIES) as client:
            async with client.operation(user_id=user.pk, operation_type="summary", estimate=10_001):
                raise AssertionError("the block must not run")

    with pytest.raises(TokenCapExceeded) as refused:
        asyncio.run(scenario())
    assert (refused.value.available, refused.value.cap) == (10_000, 10_000)


def test_async_lost_answer_and_recorder_record_each_operation_once(proxy, service_key, make_user):
    users = [make_user("enterprise") for _ in range(2)]
    proxy.fault("/api/tokens/consume", "lose_answer")
    proxy.fault("/api/tokens/consume/batch", "lose_answer")

    async def scenario():
        async with AsyncClient(proxy.url, service_key, retry=FAST_RETRIES) as client:
            single = await client.consume(user_id=users[0].pk, tokens=70, operation_type="summary")
            async with client.recorder(flush_interval=0.01) as recorder:
                async def producer(n: int) -> list:
                    return [await recorder.add(user_id=users[n % 2].pk, tokens=2, operation_type="summary")
                            for _ in range(250)]

                queued = await asyncio.gather(*(producer(n) for n in range(8)))
                await recorder.flush()
                answers = [await future for futures in queued for future in futures]
            return single, recorder, answers

    single, recorder, answers = asyncio.run(scenario())
    assert single.replayed and len(answers) == 2_000
    assert recorder.recorded + recorder.replayed == 2_000 and recorder.replayed >= 1 and not recorder.failures
    assert LedgerEntry.objects.filter(kind="consumption").count() == 2_001
    assert usage_get(user_id=users[0].pk).used + usage_get(user_id=users[1].pk).used == 70 + 4_000
    assert not reconcile()
