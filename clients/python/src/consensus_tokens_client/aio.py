"""The asyncio client: Client's methods, awaited (`async for` over history, `async with` operations)."""
from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Sequence
from datetime import date, datetime
from typing import TYPE_CHECKING, Any, TypeVar

import httpx

from . import protocol
from .client import OperationState, client_settings, consume_item, logger
from .errors import ConsensusTokensError
from .models import (BatchResult, Check, ConsumeItem, Consumption, DailyUsage, Estimate, HistoryEntry,
                     MonthlyReport, Release, Reservation, Usage)
from .retry import RetryPolicy

if TYPE_CHECKING:
    from .recorder import AsyncBatchRecorder

T = TypeVar("T")


class AsyncClient:
    """Client for asyncio code: the same methods and retry safety; share one per event loop."""

    def __init__(self, base_url: str | None = None, api_key: str | None = None, *, timeout: float = 10.0,
                 retry: RetryPolicy | None = None, transport: httpx.AsyncBaseTransport | None = None,
                 max_connections: int = 32) -> None:
        url, headers = client_settings(base_url, api_key)
        self.retry = retry or RetryPolicy()
        self._http = httpx.AsyncClient(base_url=url, headers=headers, timeout=timeout, transport=transport,
                                       limits=httpx.Limits(max_connections=max_connections,
                                                           max_keepalive_connections=max_connections))

    async def estimate(self, *, operation_type: str, topic: str, sources: Sequence[str] = (),
                       provider: str = "openai", model: str | None = None, user_id: int | None = None) -> Estimate:
        return await self.send(protocol.estimate(operation_type=operation_type, topic=topic, sources=sources,
                                                 provider=provider, model=model, user_id=user_id))

    async def check(self, *, user_id: int | None, tokens: int, operation_type: str = "") -> Check:
        return await self.send(protocol.check(user_id=user_id, tokens=tokens, operation_type=operation_type))

    async def reserve(self, *, user_id: int, tokens: int, operation_type: str = "", operation_id: str | None = None,
                      ttl_seconds: int | None = None) -> Reservation:
        return await self.send(protocol.reserve(user_id=user_id, tokens=tokens, operation_type=operation_type,
                                                operation_id=operation_id or protocol.new_operation_id(),
                                                ttl_seconds=ttl_seconds))

    async def consume(self, *, user_id: int, tokens: int, operation_type: str, operation_id: str | None = None,
                      provider: str = "", model: str = "", reservation_id: uuid.UUID | str | None = None,
                      estimated_tokens: int | None = None, script_class: str | None = None) -> Consumption:
        item = consume_item(user_id=user_id, tokens=tokens, operation_type=operation_type, operation_id=operation_id,
                            provider=provider, model=model, reservation_id=reservation_id,
                            estimated_tokens=estimated_tokens, script_class=script_class)
        return await self.send(protocol.consume(item=item))

    async def consume_batch(self, items: Sequence[ConsumeItem]) -> BatchResult:
        return await self.send(protocol.consume_batch(items=items))

    async def release(self, *, user_id: int, reservation_id: uuid.UUID | str) -> Release:
        return await self.send(protocol.release(user_id=user_id, reservation_id=reservation_id))

    async def usage(self, *, user_id: int | None = None) -> Usage:
        return await self.send(protocol.usage(user_id=user_id))

    async def history(self, *, user_id: int | None = None, since: date | datetime | str | None = None,
                      until: date | datetime | str | None = None, operation_type: str | None = None,
                      kind: str | None = None, page_size: int | None = None) -> AsyncIterator[HistoryEntry]:
        cursor: str | None = None
        while True:
            page = await self.send(protocol.history_page(user_id=user_id, since=since, until=until,
                                                         operation_type=operation_type, kind=kind,
                                                         page_size=page_size, cursor=cursor))
            for entry in page.entries:
                yield entry
            if page.cursor is None:
                return
            cursor = page.cursor

    async def analytics_daily(self, *, user_id: int | None = None, since: date | None = None,
                              until: date | None = None, group_by: str | None = None) -> list[DailyUsage]:
        return await self.send(protocol.analytics_daily(user_id=user_id, since=since, until=until,
                                                        group_by=group_by))

    async def report_monthly(self, *, user_id: int | None = None, month: str | date | None = None) -> MonthlyReport:
        return await self.send(protocol.report_monthly(user_id=user_id, month=month))

    def operation(self, *, user_id: int, operation_type: str, estimate: int | Estimate, provider: str = "",
                  model: str = "", operation_id: str | None = None, ttl_seconds: int | None = None) -> AsyncOperation:
        return AsyncOperation(self, user_id=user_id, operation_type=operation_type, estimate=estimate,
                              provider=provider, model=model, operation_id=operation_id, ttl_seconds=ttl_seconds)

    def recorder(self, **options: Any) -> AsyncBatchRecorder:
        from .recorder import AsyncBatchRecorder

        return AsyncBatchRecorder(self, **options)

    async def send(self, call: protocol.Call[T], *, retry: RetryPolicy | None = None) -> T:
        policy = retry or self.retry
        headers = {"X-Request-ID": uuid.uuid4().hex}
        for attempt in range(1, policy.attempts + 1):
            last = attempt == policy.attempts
            try:
                response = await self._http.request(call.method, call.path, json=call.json, params=call.params,
                                                    headers=headers)
            except httpx.TransportError as error:
                if last:
                    raise protocol.connection_failed(error, call, attempt) from error
                logger.info("no answer to %s %s (%s); retrying", call.method, call.path, type(error).__name__)
                await asyncio.sleep(policy.wait(attempt))
                continue
            step = protocol.interpret(call, response, policy, last=last)
            if not isinstance(step, protocol.Retry):
                return step
            logger.info("%s %s answered %s; retrying", call.method, call.path, step.error.code)
            await asyncio.sleep(policy.wait(attempt, step.retry_after))
        raise AssertionError("unreachable: the last attempt returns or raises")

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class AsyncOperation(OperationState):
    """Operation for `async with`: the estimate held on entry, settled once, else released."""

    def __init__(self, client: AsyncClient, **fields: Any) -> None:
        super().__init__(**fields)
        self._client = client

    async def __aenter__(self) -> AsyncOperation:
        self.reservation = await self._client.reserve(**self._reserve_args())
        return self

    async def settle(self, actual_tokens: int) -> Consumption | None:
        reservation = self._open()
        if actual_tokens == 0:
            await self.release()
            return None
        self.consumption = await self._client.consume(**self._settle_args(reservation, actual_tokens))
        return self.consumption

    async def release(self) -> Release:
        reservation = self._open()
        self.released = await self._client.release(user_id=self.user_id, reservation_id=reservation.reservation_id)
        return self.released

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        if self._still_held():
            try:
                await self.release()
            except ConsensusTokensError as error:
                self._release_failed(error, exc_type)
