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
items wait, so a caller faster than the server slows down instead of growing memory. `senders`
batches may be in flight at once (each its own thread, or task): the server works on one while
the client builds and reads the next.
"""
from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections import Counter, deque
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar

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


F = TypeVar("F")  # the future type: concurrent.futures.Future or asyncio.Future


class _Queue(Generic[F]):
    """The recorder's state without any I/O or locking (the recorders hold their lock around it):
    the queued items in order, the batches in flight, and what became of every item."""

    def __init__(self, max_batch: int, flush_interval: float, max_queue: int, senders: int) -> None:
        if not 1 <= max_batch <= MAX_BATCH:
            raise ValueError(f"max_batch must be between 1 and {MAX_BATCH}")
        if flush_interval < 0 or max_queue < 1 or senders < 1:
            raise ValueError("flush_interval must not be negative; max_queue and senders must be positive")
        self.max_batch = max_batch
        self.flush_interval = flush_interval
        self.max_queue = max_queue
        self.senders = senders
        self.items: deque[tuple[int, ConsumeItem, F]] = deque()  # (sequence number, item, its future)
        self.in_flight: Counter[int] = Counter()  # the first sequence number of each batch being sent
        self.added = 0  # the last sequence number given
        self.flushes = 0  # flush() calls waiting: send what is queued without waiting for the interval
        self.closing = False
        self.recorded = 0
        self.replayed = 0
        self.failures: list[ItemFailure] = []

    def has_room(self) -> bool:
        return self.closing or len(self.items) < self.max_queue

    def append(self, item: ConsumeItem, future: F) -> bool:
        """Queue the item; True when a sender should look (the first item, or a full batch)."""
        if self.closing:
            raise OperationClosed("The recorder is closed.")
        self.added += 1
        self.items.append((self.added, item, future))
        return len(self.items) == 1 or len(self.items) >= self.max_batch

    def due(self, waiting_since: float | None, now: float) -> float | None:
        """0 when a batch should go now, else how long to wait (None: until told)."""
        if not self.items:
            return None
        if len(self.items) >= self.max_batch or self.closing or self.flushes:
            return 0.0
        return max(0.0, (waiting_since if waiting_since is not None else now) + self.flush_interval - now)

    def take(self) -> list[tuple[int, ConsumeItem, F]]:
        batch = [self.items.popleft() for _ in range(min(self.max_batch, len(self.items)))]
        self.in_flight[batch[0][0]] += 1
        return batch

    def done(self, batch: list[tuple[int, ConsumeItem, F]]) -> None:
        self.in_flight[batch[0][0]] -= 1
        if not self.in_flight[batch[0][0]]:
            del self.in_flight[batch[0][0]]

    def answered_through(self, sequence: int) -> bool:
        """Whether every item up to `sequence` has its answer (batches are cut in order, so the
        oldest unanswered item heads the queue or a batch in flight)."""
        pending = [self.items[0][0]] if self.items else []
        pending.extend(self.in_flight)
        return not pending or min(pending) > sequence

    def answer(self, pending: list[tuple[int, ConsumeItem, F]], result: BatchResult) -> list[tuple[F, BatchItemResult]]:
        outcome = []
        for answer in result.items:
            outcome.append((pending[answer.index][2], answer))
            if answer.replayed:
                self.replayed += 1
            else:
                self.recorded += 1
        return outcome

    def refuse(self, pending: list[tuple[int, ConsumeItem, F]], error: BaseException) -> list[tuple[int, ConsumeItem, F]]:
        """The items the error fails, taken out of `pending`: the one a batch refusal names (the rest
        goes again), else all of them."""
        index = protocol.refused_item(error, len(pending)) if isinstance(error, ConsensusTokensError) else None
        failed = [pending.pop(index)] if index is not None else pending[:]
        if index is None:
            pending.clear()
        self.failures.extend(ItemFailure(item, error) for _, item, _ in failed)
        return failed


class _Figures:
    _queue: _Queue[Any]

    @property
    def recorded(self) -> int:
        return self._queue.recorded

    @property
    def replayed(self) -> int:
        return self._queue.replayed

    @property
    def failures(self) -> list[ItemFailure]:
        return list(self._queue.failures)


class BatchRecorder(_Figures):
    """Consumes queued by any thread and sent in batches by background threads."""

    def __init__(self, client: Client, *, max_batch: int = MAX_BATCH, flush_interval: float = 0.05,
                 max_queue: int = 100_000, senders: int = 2, retry: RetryPolicy = RECORDER_RETRY) -> None:
        self._client = client
        self._retry = retry
        self._queue: _Queue[Future[BatchItemResult]] = _Queue(max_batch, flush_interval, max_queue, senders)
        self._cond = threading.Condition()
        self._threads = [threading.Thread(target=self._run, name=f"consensus-tokens-recorder-{n}", daemon=True)
                         for n in range(senders)]
        for thread in self._threads:
            thread.start()

    def add(self, *, user_id: int, tokens: int, operation_type: str, operation_id: str | None = None,
            provider: str = "", model: str = "", reservation_id: uuid.UUID | str | None = None,
            estimated_tokens: int | None = None, script_class: str | None = None) -> Future[BatchItemResult]:
        item = consume_item(user_id=user_id, tokens=tokens, operation_type=operation_type, operation_id=operation_id,
                            provider=provider, model=model, reservation_id=reservation_id,
                            estimated_tokens=estimated_tokens, script_class=script_class)
        future: Future[BatchItemResult] = Future()
        with self._cond:
            self._cond.wait_for(self._queue.has_room)
            if self._queue.append(item, future):
                self._cond.notify_all()
        return future

    def flush(self, timeout: float | None = None) -> None:
        """Wait until every item added before this call has been answered (recorded or failed)."""
        queue = self._queue
        with self._cond:
            target = queue.added
            queue.flushes += 1
            self._cond.notify_all()
            try:
                if not self._cond.wait_for(lambda: queue.answered_through(target), timeout):
                    raise TimeoutError("queued consumes are still unanswered")
            finally:
                queue.flushes -= 1

    def close(self, timeout: float | None = None) -> None:
        """Flush, then stop the background threads; add() refuses from now on."""
        with self._cond:
            self._queue.closing = True
            self._cond.notify_all()
        for thread in self._threads:
            thread.join(timeout)
            if thread.is_alive():
                raise TimeoutError("the recorder is still sending")

    def __enter__(self) -> BatchRecorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _run(self) -> None:
        queue = self._queue
        while True:
            with self._cond:
                since = None
                while (wait := queue.due(since, time.monotonic())) != 0.0:
                    if wait is None and queue.closing:
                        return
                    since = None if wait is None else since if since is not None else time.monotonic()
                    self._cond.wait(wait)
                batch = queue.take()
                self._cond.notify_all()  # room for adders waiting on max_queue
            try:
                self._send(batch)
            finally:
                with self._cond:
                    queue.done(batch)
                    self._cond.notify_all()

    def _send(self, batch: list[tuple[int, ConsumeItem, Future[BatchItemResult]]]) -> None:
        pending = list(batch)
        while pending:
            try:
                result = self._client.send(protocol.consume_batch(items=[i for _, i, _ in pending]),
                                           retry=self._retry)
            except Exception as error:  # noqa: BLE001 - every item's future gets its outcome
                with self._cond:
                    failed = self._queue.refuse(pending, error)
                for _, _, future in failed:
                    future.set_exception(error)
                continue
            with self._cond:
                outcome = self._queue.answer(pending, result)
            for future, answer in outcome:
                future.set_result(answer)
            return


class AsyncBatchRecorder(_Figures):
    """BatchRecorder for asyncio: `await recorder.add(...)`; background tasks send the batches."""

    def __init__(self, client: AsyncClient, *, max_batch: int = MAX_BATCH, flush_interval: float = 0.05,
                 max_queue: int = 100_000, senders: int = 2, retry: RetryPolicy = RECORDER_RETRY) -> None:
        self._client = client
        self._retry = retry
        self._queue: _Queue[asyncio.Future[BatchItemResult]] = _Queue(max_batch, flush_interval, max_queue, senders)
        self._cond = asyncio.Condition()
        self._tasks: list[asyncio.Task[None]] = []

    async def add(self, *, user_id: int, tokens: int, operation_type: str, operation_id: str | None = None,
                  provider: str = "", model: str = "", reservation_id: uuid.UUID | str | None = None,
                  estimated_tokens: int | None = None,
                  script_class: str | None = None) -> asyncio.Future[BatchItemResult]:
        item = consume_item(user_id=user_id, tokens=tokens, operation_type=operation_type, operation_id=operation_id,
                            provider=provider, model=model, reservation_id=reservation_id,
                            estimated_tokens=estimated_tokens, script_class=script_class)
        future: asyncio.Future[BatchItemResult] = asyncio.get_running_loop().create_future()
        if not self._tasks:  # the tasks start with the first item: there is a running loop by then
            self._tasks = [asyncio.create_task(self._run(), name=f"consensus-tokens-recorder-{n}")
                           for n in range(self._queue.senders)]
        async with self._cond:
            await self._cond.wait_for(self._queue.has_room)
            if self._queue.append(item, future):
                self._cond.notify_all()
        return future

    async def flush(self) -> None:
        queue = self._queue
        async with self._cond:
            target = queue.added
            queue.flushes += 1
            self._cond.notify_all()
            try:
                await self._cond.wait_for(lambda: queue.answered_through(target))
            finally:
                queue.flushes -= 1

    async def aclose(self) -> None:
        async with self._cond:
            self._queue.closing = True
            self._cond.notify_all()
        await asyncio.gather(*self._tasks)

    async def __aenter__(self) -> AsyncBatchRecorder:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def _run(self) -> None:
        queue = self._queue
        while True:
            async with self._cond:
                since = None
                while (wait := queue.due(since, time.monotonic())) != 0.0:
                    if wait is None and queue.closing:
                        return
                    since = None if wait is None else since if since is not None else time.monotonic()
                    try:
                        await asyncio.wait_for(self._cond.wait(), wait)
                    except asyncio.TimeoutError:
                        pass
                batch = queue.take()
                self._cond.notify_all()
            try:
                await self._send(batch)
            finally:
                async with self._cond:
                    queue.done(batch)
                    self._cond.notify_all()

    async def _send(self, batch: list[tuple[int, ConsumeItem, asyncio.Future[BatchItemResult]]]) -> None:
        pending = list(batch)
        while pending:
            try:
                result = await self._client.send(protocol.consume_batch(items=[i for _, i, _ in pending]),
                                                 retry=self._retry)
            except Exception as error:  # noqa: BLE001 - every item's future gets its outcome
                for _, _, future in self._queue.refuse(pending, error):
                    future.set_exception(error)
                continue
            for future, answer in self._queue.answer(pending, result):
                future.set_result(answer)
            return
