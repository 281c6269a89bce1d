"""When to retry a request, and how long to wait first.

Every write the client sends carries an operation id (a reserve, a consume, each batch item) or
is idempotent by nature (a release), so repeating a request whose answer never arrived is safe:
the server records it once and answers the repeat as a replay. What is retried:

- no answer: connection refused, reset or dropped, a timeout (httpx.TransportError);
- 5xx answers (500, 502, 503 `service_unavailable`, 504);
- 429 `rate_limited`, waiting what `Retry-After` says (when it is no longer than
  `max_retry_after`; a longer wait is left to the caller: RateLimited with `retry_after`).

Never retried: any other 4xx (bad input, cap exceeded, conflicts), which a repeat cannot fix.
Waits are exponential with full jitter (a random wait between 0 and the step's ceiling), so
callers that failed together do not come back together; `Retry-After` is a floor.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime

RETRYABLE_STATUSES = frozenset({429, 500, 502, 503, 504})


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 5  # tries in all, the first one included
    backoff: float = 0.1  # the first wait's ceiling, in seconds; doubled at each retry
    max_backoff: float = 5.0  # no wait's ceiling goes past this
    max_retry_after: float = 30.0  # a longer Retry-After is not waited for: the error is raised

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError("attempts must be at least 1")
        if self.backoff < 0 or self.max_backoff < 0 or self.max_retry_after < 0:
            raise ValueError("waits must not be negative")

    def wait(self, retry: int, retry_after: float | None = None, *, rng: random.Random | None = None) -> float:
        """Seconds to wait before retry number `retry` (1 for the first retry)."""
        ceiling = min(self.max_backoff, self.backoff * 2 ** (retry - 1))
        jitter = (rng or random).uniform(0, ceiling)
        if retry_after is not None:
            # not before the server said; a little jitter on top spreads the callers it told the same
            return retry_after + min(jitter, 1.0)
        return jitter

    def retries_status(self, status: int, retry_after: float | None) -> bool:
        """Whether an answer with this status is worth repeating."""
        if status not in RETRYABLE_STATUSES:
            return False
        return retry_after is None or retry_after <= self.max_retry_after


NO_RETRIES = RetryPolicy(attempts=1)


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """`Retry-After` in seconds: delta-seconds or an HTTP date (RFC 9110 10.2.3); None if absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - (now or datetime.now(timezone.utc))).total_seconds())
