"""BatchRecorder against a live server: many threads queue consumes, one background thread sends
them in batches; nothing queued is dropped or doubled, and what the server refuses is reported
per item while the rest is recorded."""
from __future__ import annotations

import random
import threading

import pytest
from django.db.models import Count, Sum

from consensus_tokens_client import Client, OperationClosed, TokenCapExceeded, UnknownUser
from metering.models import LedgerEntry, UsagePeriod
from metering.services import reconcile, usage_get

from .conftest import FAST_RETRIES

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.within_one_period]

BATCH = "/api/tokens/consume/batch"


def test_eight_threads_record_twenty_thousand_consumes_exactly(client, make_user):
    users = [make_user("enterprise") for _ in range(4)]
    queued: dict[int, int] = {user.pk: 0 for user in users}
    lock = threading.Lock()
    futures = []

    with client.recorder(flush_interval=0.02) as recorder:
        def producer(n: int) -> None:
            rng = random.Random(n)
            mine = {user.pk: 0 for user in users}
            for i in range(2_500):
                user = users[(n + i) % len(users)]
                tokens = rng.randint(1, 9)
                futures.append(recorder.add(user_id=user.pk, tokens=tokens, operation_type="summary",
                                            operation_id=f"rec-{n}-{i}"))
                mine[user.pk] += tokens
            with lock:
                for pk, tokens in mine.items():
                    queued[pk] += tokens

        threads = [threading.Thread(target=producer, args=(n,)) for n in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        recorder.flush(timeout=120)  # everything added so far has its answer, before any close
        assert all(f.done() for f in futures)

    assert len(futures) == 20_000 and all(f.done() for f in futures)
    assert recorder.recorded == 20_000 and recorder.replayed == 0 and not recorder.failures
    ledger = LedgerEntry.objects.filter(kind="consumption").aggregate(rows=Count("id"), tokens=Sum("used_delta"))
    assert ledger == {"rows": 20_000, "tokens": sum(queued.values())}
    for user in users:
        assert usage_get(user_id=user.pk).used == queued[user.pk]
    assert not reconcile()
    with pytest.raises(OperationClosed):
        recorder.add(user_id=users[0].pk, tokens=1, operation_type="summary")


def test_a_refused_item_fails_alone_and_the_rest_is_recorded(client, make_user):
    capped = make_user("basic", can_pay=False)  # cap 10,000
    other = make_user("pro")
    with client.recorder(flush_interval=60) as recorder:  # one batch: sent by flush, not by the timer
        first = recorder.add(user_id=capped.pk, tokens=6_000, operation_type="summary")
        over = recorder.add(user_id=capped.pk, tokens=6_000, operation_type="summary")
        nobody = recorder.add(user_id=other.pk + 1_000, tokens=5, operation_type="summary")
        fine = [recorder.add(user_id=other.pk, tokens=10, operation_type="summary") for _ in range(5)]
        recorder.flush(timeout=30)
        assert first.result().replayed is False and all(not f.result().replayed for f in fine)
        assert isinstance(over.exception(), TokenCapExceeded) and isinstance(nobody.exception(), UnknownUser)
        assert {type(f.error) for f in recorder.failures} == {TokenCapExceeded, UnknownUser}
        assert sorted(f.item.tokens for f in recorder.failures) == [5, 6_000]
    assert usage_get(user_id=capped.pk).used == 6_000 and usage_get(user_id=other.pk).used == 50
    assert recorder.recorded == 6


def test_a_batch_whose_answer_is_lost_is_sent_again_and_recorded_once(proxy, service_key, make_user):
    user = make_user("pro")
    proxy.fault(BATCH, "lose_answer")
    with Client(proxy.url, service_key, retry=FAST_RETRIES) as client:
        with client.recorder(flush_interval=60) as recorder:
            futures = [recorder.add(user_id=user.pk, tokens=3, operation_type="summary") for _ in range(300)]
    assert proxy.seen[BATCH] == 2
    assert recorder.replayed == 300 and recorder.recorded == 0 and not recorder.failures
    assert all(f.result().replayed for f in futures)
    assert LedgerEntry.objects.filter(kind="consumption").count() == 300
    assert UsagePeriod.objects.get(account__user=user).used == 900


def test_full_batches_go_at_once_and_a_lone_item_after_the_interval(client, make_user):
    user = make_user("enterprise")
    with client.recorder(max_batch=100, flush_interval=0.05, max_queue=150) as recorder:
        futures = [recorder.add(user_id=user.pk, tokens=1, operation_type="summary") for _ in range(1_000)]
        # max_queue made add() wait for the sender instead of queueing all 1,000 at once
        futures[-1].result(timeout=30)
        late = recorder.add(user_id=user.pk, tokens=1, operation_type="summary")
        assert late.result(timeout=5).replayed is False  # sent by the timer, without a flush
    assert recorder.recorded == 1_001 and usage_get(user_id=user.pk).used == 1_001
