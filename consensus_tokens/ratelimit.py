"""Rate limits: the counting (metering/throttling.py decides the token API's limits: per user by
tier, per service key), and the per-IP limits on sign-in and password reset.

Counters live in the `ratelimit` cache (Redis, so limits hold across every web
process; local memory when REDIS_URL is unset). Windows are django-ratelimit's
(fixed, with a per-key jitter), but a token request counts all its limits (a
1,000-item batch: one per distinct user) with one EVALSHA of a small Lua script
instead of django-ratelimit's add-then-incr per limit, because the consume path
is the hot one. The same reply carries the "limits version", which lets every
worker keep its users' tier limits in memory until something that decides a
limit changes (limits_changed()), so a warm request costs one Redis round trip
and no SQL. Sign-in and password reset go through django-ratelimit's
`get_usage` itself.

A request over a limit answers 429 with the error shape, `Retry-After` and the
`X-RateLimit-*` headers, and leaves nothing behind but its audit row. If the
counter store is unreachable, limits fail open: a warning is logged (at most
every few seconds), `ratelimit_backend_errors_total` counts it, and Redis is not
tried again for a short while so requests do not queue on its timeouts.
"""
from __future__ import annotations

import logging
import threading
import time
import zlib
from dataclasses import dataclass
from typing import Any

from django.conf import settings
from django.core.cache import caches
from django.dispatch import Signal
from django.http import HttpResponse, JsonResponse
from django.utils.html import escape
from django_ratelimit.core import get_usage

from consensus_tokens import metrics
from consensus_tokens.client_ip import client_ip
from consensus_tokens.errors import ApplicationError, error_body

logger = logging.getLogger(__name__)

HOUR = 3600
# Counters outlive their window by this much, as django-ratelimit's EXPIRATION_FUDGE.
EXPIRATION_FUDGE = 5


class RateLimited(ApplicationError):
    status, code = 429, "rate_limited"


@dataclass(frozen=True)
class LimitState:
    """One limit as counted for this request."""

    scope: str  # "user", "service_key" or "ip"
    value: str
    limit: int
    count: int
    reset_at: int  # epoch seconds when the window ends
    key: str = ""  # the counter's key in the store

    @property
    def remaining(self) -> int:
        return max(0, self.limit - self.count)

    @property
    def exceeded(self) -> bool:
        return self.count > self.limit

    def retry_after(self, now: float | None = None) -> int:
        return max(1, self.reset_at - int(now if now is not None else time.time()))

    def headers(self) -> dict[str, str]:
        headers = {"X-RateLimit-Limit": str(self.limit), "X-RateLimit-Remaining": str(self.remaining),
                   "X-RateLimit-Reset": str(self.reset_at)}
        if self.exceeded:
            headers["Retry-After"] = str(self.retry_after())
        return headers


# --- the counter store ---------------------------------------------------------------------------

class _Breaker:
    """After the store fails, skip it for `retry_seconds` (fail open without waiting on it)."""

    def __init__(self) -> None:
        self.open_until = 0.0
        self.last_warning = 0.0
        self.lock = threading.Lock()

    def is_open(self) -> bool:
        return time.monotonic() < self.open_until

    def trip(self, error: Exception) -> None:
        now = time.monotonic()
        metrics.ratelimit_backend_errors.inc()
        with self.lock:
            self.open_until = now + settings.RATELIMIT_RETRY_SECONDS
            warn = now - self.last_warning >= settings.RATELIMIT_WARNING_INTERVAL
            if warn:
                self.last_warning = now
        if warn:
            logger.warning("rate limit store unreachable, limits fail open: %s", error)


_breaker = _Breaker()


# INCR each counter (an expiry when it is new: its window is in its key, the expiry
# only clears it away), then read the limits version, all in one round trip. A counter
# at 0 or below was given back after it expired (counters_give_back) and gets one too.
# ARGV holds each key's expiry, or one for all of them.
_COUNT_SCRIPT = """
local n = #KEYS - 1
local counts = {}
for i = 1, n do
  local count = redis.call('INCR', KEYS[i])
  if count <= 1 then redis.call('EXPIRE', KEYS[i], ARGV[i] or ARGV[1]) end
  counts[i] = count
end
counts[n + 1] = tonumber(redis.call('GET', KEYS[n + 1]) or 0)
return counts
"""


def _prefix() -> str:
    return getattr(settings, "RATELIMIT_CACHE_PREFIX", "rl:")  # django-ratelimit's setting and default


def _limits_version_key() -> str:
    return f"{_prefix()}ct:limits-version"


def _redis_client(cache: Any) -> Any | None:
    client = getattr(cache, "_cache", None)
    if client is not None and hasattr(client, "get_client"):
        # Django builds a new redis.Redis (over the same pool) on every call; keep one.
        redis_client = client.__dict__.get("_ct_write_client")
        if redis_client is None:
            redis_client = client.__dict__["_ct_write_client"] = client.get_client(write=True)
        return redis_client
    return None


def _count_script(cache: Any, client: Any) -> Any:
    """The counting script, registered once per cache (redis-py's Script sends EVALSHA
    and loads the script itself when the server answers NOSCRIPT, e.g. after a restart)."""
    script = cache.__dict__.get("_ct_count_script")
    if script is None:
        script = cache.__dict__["_ct_count_script"] = client.register_script(_COUNT_SCRIPT)
    return script


def counters_hit(entries: list[tuple[str, int]]) -> tuple[list[int], int | None] | None:
    """Add one to each (key, period) counter: their counts after, and the limits version
    (None without Redis); None when the store is unreachable. On Redis: one EVALSHA."""
    if _breaker.is_open():
        metrics.ratelimit_backend_errors.inc()
        return None
    cache = caches[settings.RATELIMIT_USE_CACHE]
    try:
        client = _redis_client(cache)
        if client is not None:
            keys = [key for key, _ in entries]
            keys.append(_limits_version_key())
            periods = {period for _, period in entries}
            args = ([next(iter(periods)) + EXPIRATION_FUDGE] if len(periods) <= 1
                    else [period + EXPIRATION_FUDGE for _, period in entries])
            reply = _count_script(cache, client)(keys=keys, args=args, client=client)
            return reply[:-1], reply[-1]
        counts = []
        for key, period in entries:  # local memory: as django-ratelimit does it
            counts.append(1 if cache.add(key, 1, period + EXPIRATION_FUDGE) else cache.incr(key))
        return counts, None
    except Exception as error:  # noqa: BLE001 - any store failure fails open
        _breaker.trip(error)
        return None


# What each process keeps of the limits (metering's users' tier limits): emptied by limits_changed().
_local_limit_caches: list = []


def register_local_limits(clear) -> None:
    """clear() empties a per-process copy of limits; limits_changed() calls it."""
    if clear not in _local_limit_caches:
        _local_limit_caches.append(clear)


def limits_changed() -> None:
    """Something that decides a request limit changed (a tier's requests_per_hour, an
    account's tier, the default tier): drop this process's cached limits and bump the
    limits version, so every other worker drops its own at its next counted request.
    Call it after the change is committed (metering's receivers do), or other workers
    may read the old rows again."""
    for clear in _local_limit_caches:
        clear()
    try:
        client = _redis_client(caches[settings.RATELIMIT_USE_CACHE])
        if client is not None:
            client.incr(_limits_version_key())
    except Exception as error:  # noqa: BLE001 - the change stands; workers catch up within the TTL
        logger.warning("rate limit store unreachable, other workers keep their cached limits for up to "
                       "RATELIMIT_TIER_CACHE_SECONDS: %s", error)


def limit_entries(specs: list[tuple[str, Any]], period: int, ts: int) -> list[tuple[str, int, int]]:
    """Each (scope, value)'s counter key, its period and the window's end: django-ratelimit's
    windows (django_ratelimit.core._get_window, fixed with a per-value jitter), computed in
    one loop with one clock read, since a batch has a thousand. Unlike django-ratelimit's
    keys these leave the limit out, so a staff change to a limit keeps the hour's count
    (lowering a limit takes effect at once instead of granting a fresh budget)."""
    prefix = _prefix()
    start = ts - ts % period
    entries = []
    for scope, value in specs:
        value = str(value)
        window = ts if period == 1 else start + zlib.crc32(value.encode()) % period
        if window < ts:
            window += period
        entries.append((f"{prefix}ct:{scope}:{value}:{window}", period, window))
    return entries


def counters_give_back(keys: list[str]) -> None:
    """Take back one count from each key (a refused request spends no other budget)."""
    if not keys or _breaker.is_open():
        return
    cache = caches[settings.RATELIMIT_USE_CACHE]
    try:
        client = _redis_client(cache)
        if client is not None:
            pipe = client.pipeline(transaction=False)
            for key in keys:
                pipe.decr(key)
            pipe.execute()
        else:
            for key in keys:
                cache.decr(key)
    except Exception as error:  # noqa: BLE001 - any store failure fails open
        _breaker.trip(error)


# --- who a token request is for ------------------------------------------------------------------

# --- per IP on sign-in and password reset --------------------------------------------------------

# Sent when a sign-in or password reset is refused for its address (metering audits it).
ip_rate_limited = Signal()  # request, action ("login" | "password_reset")

def _client_ip_group(path: str) -> str:
    return f"ct:ip:{path}"


class RateLimitMiddleware:
    """Adds the X-RateLimit-* headers to every limited response, and limits POSTs to
    the paths in RATELIMIT_IP_PATHS (sign-in, password reset) per client IP."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        if request.method == "POST":
            rate = settings.RATELIMIT_IP_PATHS.get(request.path_info)
            if rate and settings.RATELIMIT_ENABLE:
                refused = self._limit_ip(request, rate)
                if refused is not None:
                    return refused
        response = self.get_response(request)
        state = getattr(request, "ratelimit", None)
        if state is not None:
            for name, value in state.headers().items():
                response[name] = value
        return response

    def _limit_ip(self, request, rate: str):
        if _breaker.is_open():
            metrics.ratelimit_backend_errors.inc()
            return None
        try:
            # key="ip": django-ratelimit asks RATELIMIT_IP_META_KEY, our client_ip (behind trusted proxies, the
            # forwarded client; IPv6 grouped by its /64)
            usage = get_usage(request, group=_client_ip_group(request.path_info), key="ip", rate=rate,
                              method="POST", increment=True)
        except Exception as error:  # noqa: BLE001 - the store failing fails open
            _breaker.trip(error)
            return None
        if usage is None:
            return None
        state = LimitState(scope="ip", value=client_ip(request), limit=usage["limit"],
                           count=usage["count"], reset_at=int(time.time()) + max(0, usage["time_left"]))
        request.ratelimit = state
        if not usage["should_limit"]:
            return None
        metrics.ratelimit_refused.labels(scope="ip").inc()
        action = "password_reset" if "password" in request.path_info else "login"
        ip_rate_limited.send(sender=type(self), request=request, action=action)
        message = f"Too many attempts from your address; retry in {state.retry_after()} s."
        if "application/json" in request.headers.get("Accept", ""):
            response = JsonResponse(error_body("rate_limited", message), status=429)
        else:
            response = HttpResponse(f"<!doctype html><title>Too many attempts</title><h1>Too many attempts</h1>"
                                    f"<p>{escape(message)}</p>", status=429)
        for name, value in state.headers().items():
            response[name] = value
        return response
