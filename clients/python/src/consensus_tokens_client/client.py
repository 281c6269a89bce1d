"""The synchronous client (AsyncClient in aio.py has the same methods, awaited)."""
from __future__ import annotations

import logging
import os
import time
import uuid
from collections.abc import Iterator, Sequence
from datetime import date, datetime
from typing import TYPE_CHECKING, Any, TypeVar

import httpx

from . import protocol
from .errors import ConsensusTokensError, OperationClosed, ReservationExpired, ReservationNotFound, ReservationSettled
from .models import (BatchResult, Check, ConsumeItem, Consumption, DailyUsage, Estimate, HistoryEntry,
                     MonthlyReport, Release, Reservation, Usage)
from .retry import RetryPolicy
from .version import __version__

if TYPE_CHECKING:
    from .recorder import BatchRecorder

T = TypeVar("T")
logger = logging.getLogger("consensus_tokens_client")

# A release that finds the hold already gone has nothing left to do.
HOLD_GONE = (ReservationSettled, ReservationExpired, ReservationNotFound)


def client_settings(base_url: str | None, api_key: str | None) -> tuple[str, dict[str, str]]:
    """The base URL and headers, from the arguments or CONSENSUS_TOKENS_URL / CONSENSUS_TOKENS_API_KEY."""
    base_url = base_url or os.environ.get("CONSENSUS_TOKENS_URL")
    api_key = api_key or os.environ.get("CONSENSUS_TOKENS_API_KEY")
    if not base_url:
        raise ValueError("base_url is required (or set CONSENSUS_TOKENS_URL)")
    if not api_key:
        raise ValueError("api_key is required (or set CONSENSUS_TOKENS_API_KEY)")
    return base_url.rstrip("/"), {"Authorization": f"Api-Key {api_key}", "Accept": "application/json",
                                  "User-Agent": f"consensus-tokens-client/{__version__}"}


def consume_item(*, user_id: int, tokens: int, operation_type: str, operation_id: str | None, provider: str,
                 model: str, reservation_id: uuid.UUID | str | None, estimated_tokens: int | None,
                 script_class: str | None = None) -> ConsumeItem:
    return ConsumeItem(user_id=user_id, tokens=tokens, operation_type=operation_type,
                       operation_id=operation_id or protocol.new_operation_id(), provider=provider, model=model,
                       reservation_id=reservation_id, estimated_tokens=estimated_tokens, script_class=script_class)


class Client:
    """The Consensus Tokens API for a backend service, over one pooled HTTP connection set.

    Thread-safe: share one Client across threads. Every write carries an operation id (made here
    once, or yours), so the retries the `retry` policy makes can never record anything twice.
    """

    def __init__(self, base_url: str | None = None, api_key: str | None = None, *, timeout: float = 10.0,
                 retry: RetryPolicy | None = None, transport: httpx.BaseTransport | None = None,
                 max_connections: int = 32) -> None:
        url, headers = client_settings(base_url, api_key)
        self.retry = retry or RetryPolicy()
        self._http = httpx.Client(base_url=url, headers=headers, timeout=timeout, transport=transport,
                                  limits=httpx.Limits(max_connections=max_connections,
                                                      max_keepalive_connections=max_connections))

    # --- the calls -------------------------------------------------------------------------------------
    def estimate(self, *, operation_type: str, topic: str, sources: Sequence[str] = (), provider: str = "openai",
                 model: str | None = None, user_id: int | None = None) -> Estimate:
        return self.send(protocol.estimate(operation_type=operation_type, topic=topic, sources=sources,
                                           provider=provider, model=model, user_id=user_id))

    def check(self, *, user_id: int | None, tokens: int, operation_type: str = "") -> Check:
        return self.send(protocol.check(user_id=user_id, tokens=tokens, operation_type=operation_type))

    def reserve(self, *, user_id: int, tokens: int, operation_type: str = "", operation_id: str | None = None,
                ttl_seconds: int | None = None) -> Reservation:
        """Hold `tokens` for one operation; TokenCapExceeded (nothing held) when they do not fit."""
        return self.send(protocol.reserve(user_id=user_id, tokens=tokens, operation_type=operation_type,
                                          operation_id=operation_id or protocol.new_operation_id(),
                                          ttl_seconds=ttl_seconds))

    def consume(self, *, user_id: int, tokens: int, operation_type: str, operation_id: str | None = None,
                provider: str = "", model: str = "", reservation_id: uuid.UUID | str | None = None,
                estimated_tokens: int | None = None, script_class: str | None = None) -> Consumption:
        item = consume_item(user_id=user_id, tokens=tokens, operation_type=operation_type, operation_id=operation_id,
                            provider=provider, model=model, reservation_id=reservation_id,
                            estimated_tokens=estimated_tokens, script_class=script_class)
        return self.send(protocol.consume(item=item))

    def consume_batch(self, items: Sequence[ConsumeItem]) -> BatchResult:
        """Up to 1,000 consumes, all or nothing (a refusal names the item: error.details["index"])."""
        return self.send(protocol.consume_batch(items=items))

    def release(self, *, user_id: int, reservation_id: uuid.UUID | str) -> Release:
        return self.send(protocol.release(user_id=user_id, reservation_id=reservation_id))

    def usage(self, *, user_id: int | None = None) -> Usage:
        return self.send(protocol.usage(user_id=user_id))

    def history(self, *, user_id: int | None = None, since: date | datetime | str | None = None,
                until: date | datetime | str | None = None, operation_type: str | None = None,
                kind: str | None = None, page_size: int | None = None) -> Iterator[HistoryEntry]:
        """The ledger, newest first, every page (fetched as the iteration reaches it)."""
        cursor: str | None = None
        while True:
            page = self.send(protocol.history_page(user_id=user_id, since=since, until=until,
                                                   operation_type=operation_type, kind=kind, page_size=page_size,
                                                   cursor=cursor))
            yield from page.entries
            if page.cursor is None:
                return
            cursor = page.cursor

    def analytics_daily(self, *, user_id: int | None = None, since: date | None = None, until: date | None = None,
                        group_by: str | None = None) -> list[DailyUsage]:
        return self.send(protocol.analytics_daily(user_id=user_id, since=since, until=until, group_by=group_by))

    def report_monthly(self, *, user_id: int | None = None, month: str | date | None = None) -> MonthlyReport:
        return self.send(protocol.report_monthly(user_id=user_id, month=month))

    def operation(self, *, user_id: int, operation_type: str, estimate: int | Estimate, provider: str = "",
                  model: str = "", operation_id: str | None = None, ttl_seconds: int | None = None) -> Operation:
        """`with client.operation(...) as op: ...; op.settle(actual)` (see Operation). `estimate`: the
        tokens to hold, or the Estimate itself (its tokens held, its script class sent with the settle)."""
        return Operation(self, user_id=user_id, operation_type=operation_type, estimate=estimate, provider=provider,
                         model=model, operation_id=operation_id, ttl_seconds=ttl_seconds)

    def recorder(self, **options: Any) -> BatchRecorder:
        """A BatchRecorder sending this client's consumes in batches (see recorder.py for the options)."""
        from .recorder import BatchRecorder

        return BatchRecorder(self, **options)

    # --- sending -----------------------------------------------------------------------------------------
    def send(self, call: protocol.Call[T], *, retry: RetryPolicy | None = None) -> T:
        """One call, repeated as the retry policy says; the same request id on every attempt."""
        policy = retry or self.retry
        headers = {"X-Request-ID": uuid.uuid4().hex}
        for attempt in range(1, policy.attempts + 1):
            last = attempt == policy.attempts
            try:
                response = self._http.request(call.method, call.path, json=call.json, params=call.params,
                                              headers=headers)
            except httpx.TransportError as error:
                if last:
                    raise protocol.connection_failed(error, call, attempt) from error
                logger.info("no answer to %s %s (%s); retrying", call.method, call.path, type(error).__name__)
                time.sleep(policy.wait(attempt))
                continue
            step = protocol.interpret(call, response, policy, last=last)
            if not isinstance(step, protocol.Retry):
                return step
            logger.info("%s %s answered %s; retrying", call.method, call.path, step.error.code)
            time.sleep(policy.wait(attempt, step.retry_after))
        raise AssertionError("unreachable: the last attempt returns or raises")

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class OperationState:
    """What Operation and AsyncOperation share: the operation's fields, and which step is allowed."""

    def __init__(self, *, user_id: int, operation_type: str, estimate: int | Estimate, provider: str = "",
                 model: str = "", operation_id: str | None = None, ttl_seconds: int | None = None) -> None:
        self.user_id = user_id
        self.operation_type = operation_type
        self.estimate = estimate.tokens if isinstance(estimate, Estimate) else estimate
        self.script_class = estimate.script_class if isinstance(estimate, Estimate) else None
        self.provider = provider
        self.model = model
        self.operation_id = operation_id or protocol.new_operation_id()
        self.ttl_seconds = ttl_seconds
        self.reservation: Reservation | None = None
        self.consumption: Consumption | None = None
        self.released: Release | None = None

    def _reserve_args(self) -> dict[str, Any]:
        return {"user_id": self.user_id, "tokens": self.estimate, "operation_type": self.operation_type,
                "operation_id": self.operation_id, "ttl_seconds": self.ttl_seconds}

    def _settle_args(self, reservation: Reservation, actual_tokens: int) -> dict[str, Any]:
        return {"user_id": self.user_id, "tokens": actual_tokens, "operation_type": self.operation_type,
                "operation_id": self.operation_id, "provider": self.provider, "model": self.model,
                "reservation_id": reservation.reservation_id, "estimated_tokens": self.estimate,
                "script_class": self.script_class}

    def _open(self) -> Reservation:
        if self.reservation is None:
            raise OperationClosed("The operation is not entered: use it as `with client.operation(...) as op`.")
        if self.consumption is not None or self.released is not None:
            raise OperationClosed(f"Operation {self.operation_id} is already "
                                  f"{'settled' if self.consumption is not None else 'released'}.")
        return self.reservation

    def _still_held(self) -> bool:
        """Whether leaving the block must release the hold (entered, neither settled nor released)."""
        return self.reservation is not None and self.consumption is None and self.released is None

    def _release_failed(self, error: ConsensusTokensError, exc_type: type[BaseException] | None) -> None:
        if isinstance(error, HOLD_GONE):
            return  # settled by a settle whose answer was lost, or expired: nothing is held any more
        if exc_type is None:
            raise error
        # the block's own error matters more; the hold frees itself at its expiry
        logger.warning("could not release the hold of operation %s; it expires at %s", self.operation_id,
                       self.reservation.expires_at if self.reservation else "?", exc_info=error)


class Operation(OperationState):
    """One metered operation: the estimate held on entry, the actual tokens settled once.

        with client.operation(user_id=42, operation_type="consensus", estimate=est.tokens) as op:
            answer = call_the_model(...)
            op.settle(actual_tokens)

    Entering reserves the estimate (TokenCapExceeded before the block runs if it does not fit).
    settle() consumes against the hold, under the operation id, exactly once; settle(0) releases
    it. An exception in the block, or leaving it without settle(), releases the hold.
    """

    def __init__(self, client: Client, **fields: Any) -> None:
        super().__init__(**fields)
        self._client = client

    def __enter__(self) -> Operation:
        self.reservation = self._client.reserve(**self._reserve_args())
        return self

    def settle(self, actual_tokens: int) -> Consumption | None:
        """Record the tokens the operation really used (None when 0: the hold is released)."""
        reservation = self._open()
        if actual_tokens == 0:
            self.release()
            return None
        self.consumption = self._client.consume(**self._settle_args(reservation, actual_tokens))
        return self.consumption

    def release(self) -> Release:
        reservation = self._open()
        self.released = self._client.release(user_id=self.user_id, reservation_id=reservation.reservation_id)
        return self.released

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        if self._still_held():
            try:
                self.release()
            except ConsensusTokensError as error:
                self._release_failed(error, exc_type)
