"""Recording many consumes in batches, off the caller's thread (or task).

    with client.recorder(flush_interval=0.05) as recorder:
        for call in calls:
            recorder.add(user_id=call.user, tokens=call.tokens, operation_type="summary")
    # leaving the block flushes: every queued consume has been answered
    print(recorder.recorded, recorder.failures)

`add` queues one consume (with its operation id, made now or yours) and returns a future of its
outcome; a background thread sends the queue as batches of up to `max_batch` items, at once when
a batch is full, else `flush_interval` seconds after the first item waits. The batch endpoint is
all or nothing, so when the server refuses a batch because of one item (a user past the cap, an
invalid item) that item alone fails and the rest go again. Retries reuse the same operation ids,
so nothing is recorded twice; the recorder retries longer than a single call does (`retry`).
Nothing queued is ever dropped: each item ends recorded, replayed or failed (its future raises,
and it is listed in `failures` with the error). `flush()` waits for what was added before it;
`close()` (or leaving the `with`) flushes and stops the thread. `add` blocks while `max_queue`
items wait, so a caller faster than the server slows down instead of growing memory.
"""
from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING

from . import protocol
from .client import consume_item
from .errors import ConsensusTokensError, OperationClosed
from .models import BatchItemResult, BatchResult, ConsumeItem
from .retry import RetryPolicy

if TYPE_CHECKING:
    from .aio import AsyncClient
    from .client import Client

MAX_BATCH = 1000  # the server's limit per batch
# About a minute of retrying before a batch's items are reported failed (a server restart, a failover).
RECORDER_RETRY = RetryPolicy(attempts=12, backoff=0.2, max_backoff=8.0, max_retry_after=60.0)


@dataclass(frozen=True)
class ItemFailure:
    item: ConsumeItem
    error: BaseException


class _Tally:
    """What became of the items: shared by both recorders."""

    def __init__(self, max_batch: int, flush_interval: float, max_queue: int) -> None:
        if not 1 <= max_batch <= MAX_BATCH:
            raise ValueError(f"max_batch must be between 1 and {MAX_BATCH}")
        if flush_interval < 0 or max_queue < 1:
            raise ValueError("flush_interval must not be negative and max_queue must be positive")
        self.max_batch = max_batch
        self.flush_interval = flush_interval
        self.max_queue = max_queue
        self.recorded = 0
        self.replayed = 0
        self.failures: list[ItemFailure] = []
        self.added = 0
        self.answered = 0
        self.closing = False

    def settle(self, batch: list[ConsumeItem], result: BatchResult) -> list[BatchItemResult]:
        answers: list[BatchItemResult] = [None] * len(batch)  # type: ignore[list-item]
        for answer in result.items:
            answers[answer.index] = answer
            if answer.replayed:
                self.replayed += 1
            else:
                self.recorded += 1
        return answers

    def fail(self, item: ConsumeItem, error: BaseException) -> None:
        self.failures.append(ItemFailure(item, error))

    def refusal(self, error: BaseException, count: int) -> int | None:
        return protocol.refused_item(error, count) if isinstance(error, ConsensusTokensError) else None


class BatchRecorder:
    """Consumes queued by any thread and sent in batches by one background thread."""

    def __init__(self, client: Client, *, max_batch: int = MAX_BATCH, flush_interval: float = 0.05,
                 max_queue: int = 100_000, retry: RetryPolicy = RECORDER_RETRY) -> None:
        self._client = client
        self._retry = retry
        self._tally = _Tally(max_batch, flush_interval, max_queue)
        self._queue: deque[tuple[ConsumeItem, Future[BatchItemResult]]] = deque()
        self._flushes = 0  # flush() calls waiting: send what is queued without waiting for the interval
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="consensus-tokens-recorder", daemon=True)
        self._thread.start()

    @property
    def recorded(self) -> int:
        return self._tally.recorded

    @property
    def replayed(self) -> int:
        return self._tally.replayed

    @property
    def failures(self) -> list[ItemFailure]:
        return list(self._tally.failures)

    def add(self, *, user_id: int, tokens: int, operation_type: str, operation_id: str | None = None,
            provider: str = "", model: str = "", reservation_id: uuid.UUID | str | None = None,
            estimated_tokens: int | None = None) -> Future[BatchItemResult]:
        item = consume_item(user_id=user_id, tokens=tokens, operation_type=operation_type, operation_id=operation_id,
                            provider=provider, model=model, reservation_id=reservation_id,
                            estimated_tokens=estimated_tokens)
        future: Future[BatchItemResult] = Future()
        tally = self._tally
        with self._cond:
            self._cond.wait_for(lambda: tally.closing or len(self._queue) < tally.max_queue)
            if tally.closing:
                raise OperationClosed("The recorder is closed.")
            self._queue.append((item, future))
            tally.added += 1
            if len(self._queue) == 1 or len(self._queue) >= tally.max_batch:
                self._cond.notify_all()
        return future

    def flush(self, timeout: float | None = None) -> None:
        """Wait until every item added before this call has been answered (recorded or failed)."""
        tally = self._tally
        with self._cond:
            target = tally.added
            self._flushes += 1
            self._cond.notify_all()
            try:
                if not self._cond.wait_for(lambda: tally.answered >= target, timeout):
                    raise TimeoutError(f"{target - tally.answered} queued consumes still unanswered")
            finally:
                self._flushes -= 1

    def close(self, timeout: float | None = None) -> None:
        """Flush, then stop the background thread; add() refuses from now on."""
        with self._cond:
            self._tally.closing = True
            self._cond.notify_all()
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError("the recorder is still sending")

    def __enter__(self) -> BatchRecorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _next_batch(self) -> list[tuple[ConsumeItem, Future[BatchItemResult]]] | None:
        tally = self._tally
        with self._cond:
            due: float | None = None
            while True:
                if self._queue and (len(self._queue) >= tally.max_batch or tally.closing or self._flushes):
                    break
                if not self._queue:
                    if tally.closing:
                        return None
                    due = None
                    self._cond.wait()
                    continue
                now = time.monotonic()
                due = due if due is not None else now + tally.flush_interval
                if now >= due:
                    break
                self._cond.wait(due - now)
            batch = [self._queue.popleft() for _ in range(min(tally.max_batch, len(self._queue)))]
            self._cond.notify_all()  # room for adders waiting on max_queue
            return batch

    def _run(self) -> None:
        while (batch := self._next_batch()) is not None:
            try:
                self._send(list(batch))  # _send takes refused items out of its list
            finally:
                with self._cond:
                    self._tally.answered += len(batch)
                    self._cond.notify_all()

    def _send(self, pending: list[tuple[ConsumeItem, Future[BatchItemResult]]]) -> None:
        tally = self._tally
        while pending:
            items = [item for item, _ in pending]
            try:
                result = self._client.send(protocol.consume_batch(items=items), retry=self._retry)
            except Exception as error:  # noqa: BLE001 - every item's future gets its outcome
                index = tally.refusal(error, len(pending))
                failed = [pending.pop(index)] if index is not None else pending
                for item, future in failed:
                    tally.fail(item, error)
                    future.set_exception(error)
                if index is None:
                    return
                continue
            for (_, future), answer in zip(pending, tally.settle(items, result)):
                future.set_result(answer)
            return


class AsyncBatchRecorder:
    """BatchRecorder for asyncio: `await recorder.add(...)`, a background task sends the batches."""

    def __init__(self, client: AsyncClient, *, max_batch: int = MAX_BATCH, flush_interval: float = 0.05,
                 max_queue: int = 100_000, retry: RetryPolicy = RECORDER_RETRY) -> None:
        self._client = client
        self._retry = retry
        self._tally = _Tally(max_batch, flush_interval, max_queue)
        self._queue: deque[tuple[ConsumeItem, asyncio.Future[BatchItemResult]]] = deque()
        self._flushes = 0
        self._cond = asyncio.Condition()
        self._task: asyncio.Task[None] | None = None

    @property
    def recorded(self) -> int:
        return self._tally.recorded

    @property
    def replayed(self) -> int:
        return self._tally.replayed

    @property
    def failures(self) -> list[ItemFailure]:
        return list(self._tally.failures)

    async def add(self, *, user_id: int, tokens: int, operation_type: str, operation_id: str | None = None,
                  provider: str = "", model: str = "", reservation_id: uuid.UUID | str | None = None,
                  estimated_tokens: int | None = None) -> asyncio.Future[BatchItemResult]:
        item = consume_item(user_id=user_id, tokens=tokens, operation_type=operation_type, operation_id=operation_id,
                            provider=provider, model=model, reservation_id=reservation_id,
                            estimated_tokens=estimated_tokens)
        future: asyncio.Future[BatchItemResult] = asyncio.get_running_loop().create_future()
        tally = self._tally
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="consensus-tokens-recorder")
        async with self._cond:
            await self._cond.wait_for(lambda: tally.closing or len(self._queue) < tally.max_queue)
            if tally.closing:
                raise OperationClosed("The recorder is closed.")
            self._queue.append((item, future))
            tally.added += 1
            self._cond.notify_all()
        return future

    async def flush(self) -> None:
        tally = self._tally
        async with self._cond:
            target = tally.added
            self._flushes += 1
            self._cond.notify_all()
            try:
                await self._cond.wait_for(lambda: tally.answered >= target)
            finally:
                self._flushes -= 1

    async def aclose(self) -> None:
        async with self._cond:
            self._tally.closing = True
            self._cond.notify_all()
        if self._task is not None:
            await self._task

    async def __aenter__(self) -> AsyncBatchRecorder:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def _next_batch(self) -> list[tuple[ConsumeItem, asyncio.Future[BatchItemResult]]] | None:
        tally = self._tally
        async with self._cond:
            due: float | None = None
            while True:
                if self._queue and (len(self._queue) >= tally.max_batch or tally.closing or self._flushes):
                    break
                if not self._queue:
                    if tally.closing:
                        return None
                    due = None
                    await self._cond.wait()
                    continue
                now = time.monotonic()
                due = due if due is not None else now + tally.flush_interval
                if now >= due:
                    break
                try:
                    await asyncio.wait_for(self._cond.wait(), due - now)
                except asyncio.TimeoutError:
                    pass
            batch = [self._queue.popleft() for _ in range(min(tally.max_batch, len(self._queue)))]
            self._cond.notify_all()
            return batch

    async def _run(self) -> None:
        while (batch := await self._next_batch()) is not None:
            try:
                await self._send(list(batch))
            finally:
                async with self._cond:
                    self._tally.answered += len(batch)
                    self._cond.notify_all()

    async def _send(self, pending: list[tuple[ConsumeItem, asyncio.Future[BatchItemResult]]]) -> None:
        tally = self._tally
        while pending:
            items = [item for item, _ in pending]
            try:
                result = await self._client.send(protocol.consume_batch(items=items), retry=self._retry)
            except Exception as error:  # noqa: BLE001 - every item's future gets its outcome
                index = tally.refusal(error, len(pending))
                failed = [pending.pop(index)] if index is not None else pending
                for item, future in failed:
                    tally.fail(item, error)
                    future.set_exception(error)
                if index is None:
                    return
                continue
            for (_, future), answer in zip(pending, tally.settle(items, result)):
                future.set_result(answer)
            return
