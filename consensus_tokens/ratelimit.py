"""Rate limits: per user by tier, per service key, per IP on sign-in and password reset.

Counters live in the `ratelimit` cache (Redis, so limits hold across every web
process; local memory when REDIS_URL is unset). Windows are django-ratelimit's
(fixed, with a per-key jitter), but a token request counts all its limits in one
pipelined INCR+EXPIRE round trip instead of django-ratelimit's add-then-incr per
limit, because the consume path is the hot one. Sign-in and password reset go
through django-ratelimit's `get_usage` itself.

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
from dataclasses import dataclass
from typing import Any, Iterable

from django.conf import settings
from django.core.cache import caches
from django.db import connection
from django.http import HttpResponse, JsonResponse
from django.utils.html import escape
from django_ratelimit.core import _get_window, get_usage
from rest_framework.exceptions import ParseError
from rest_framework.throttling import BaseThrottle

from consensus_tokens import metrics
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


def _redis_client(cache: Any) -> Any | None:
    client = getattr(cache, "_cache", None)
    if client is not None and hasattr(client, "get_client"):
        # Django builds a new redis.Redis (over the same pool) on every call; keep one.
        redis_client = client.__dict__.get("_ct_write_client")
        if redis_client is None:
            redis_client = client.__dict__["_ct_write_client"] = client.get_client(write=True)
        return redis_client
    return None


def counters_hit(entries: list[tuple[str, int]]) -> list[int] | None:
    """Add one to each (key, period) counter; their counts after, or None when the
    store is unreachable. On Redis: one pipelined round trip for all of them."""
    if not entries:
        return []
    if _breaker.is_open():
        metrics.ratelimit_backend_errors.inc()
        return None
    cache = caches[settings.RATELIMIT_USE_CACHE]
    try:
        client = _redis_client(cache)
        if client is not None:
            pipe = client.pipeline(transaction=False)
            for key, period in entries:
                pipe.incr(key)
                pipe.expire(key, period + EXPIRATION_FUDGE)
            return [int(n) for n in pipe.execute()[::2]]
        counts = []
        for key, period in entries:  # local memory: as django-ratelimit does it
            counts.append(1 if cache.add(key, 1, period + EXPIRATION_FUDGE) else cache.incr(key))
        return counts
    except Exception as error:  # noqa: BLE001 - any store failure fails open
        _breaker.trip(error)
        return None


def _limit_entry(group: str, value: str, period: int) -> tuple[str, int, int]:
    """The counter's key, its period and the window's end. Unlike django-ratelimit's keys
    this one leaves the limit out, so a staff change to a limit keeps the hour's count
    (lowering a limit takes effect at once instead of granting a fresh budget)."""
    window = _get_window(value, period)
    prefix = getattr(settings, "RATELIMIT_CACHE_PREFIX", "rl:")  # django-ratelimit's setting and default
    return f"{prefix}{group}:{value}:{window}", period, window


def limits_count(specs: Iterable[tuple[str, str, int]], *, period: int = HOUR) -> list[LimitState] | None:
    """Count this request against each (scope, value, limit); None if the store is down."""
    specs = list(specs)
    entries = [_limit_entry(f"ct:{scope}", value, period) for scope, value, _ in specs]
    counts = counters_hit([(key, p) for key, p, _ in entries])
    if counts is None:
        return None
    return [LimitState(scope=scope, value=value, limit=limit, count=count, reset_at=window, key=key)
            for (scope, value, limit), count, (key, _, window) in zip(specs, counts, entries)]


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


def binding_limit(states: list[LimitState]) -> LimitState | None:
    """The limit to report: an exceeded one if any, else the one with least room."""
    if not states:
        return None
    exceeded = [s for s in states if s.exceeded]
    if exceeded:
        return max(exceeded, key=lambda s: s.reset_at)
    return min(states, key=lambda s: (s.remaining, s.scope != "user"))


# --- who a token request is for ------------------------------------------------------------------

class _TierLimits:
    """user id -> (requests per hour, has an account), cached in-process for a few
    seconds so a staff change to a tier applies within RATELIMIT_TIER_CACHE_SECONDS."""

    MAX_ENTRIES = 100_000

    def __init__(self) -> None:
        self.entries: dict[int, tuple[int, bool, float]] = {}
        self.default: tuple[int, float] | None = None

    def clear(self) -> None:
        self.entries.clear()
        self.default = None

    def _default_limit(self, now: float) -> int:
        if self.default is None or self.default[1] <= now:
            from metering.models import Tier

            rph = Tier.objects.filter(slug=settings.DEFAULT_TIER).values_list("requests_per_hour", flat=True).first()
            self.default = (100 if rph is None else rph, now + settings.RATELIMIT_TIER_CACHE_SECONDS)
        return self.default[0]

    def get(self, user_ids: list[int]) -> dict[int, tuple[int, bool]]:
        now = time.monotonic()
        found: dict[int, tuple[int, bool]] = {}
        missing = []
        for uid in user_ids:
            entry = self.entries.get(uid)
            if entry is not None and entry[2] > now:
                found[uid] = (entry[0], entry[1])
            else:
                missing.append(uid)
        if missing:
            from metering.models import Account, Tier

            if len(self.entries) > self.MAX_ENTRIES:
                self.entries.clear()
            if connection.vendor == "postgresql":
                # Plain SQL: this runs on most token requests of a large user base, and the
                # ORM's query building cost several times the query itself (bench/).
                with connection.cursor() as cursor:
                    cursor.execute(f"SELECT a.user_id, t.requests_per_hour FROM {Account._meta.db_table} a "
                                   f"LEFT JOIN {Tier._meta.db_table} t ON t.id = a.tier_id "
                                   "WHERE a.user_id = ANY(%s)", [missing])
                    rows = dict(cursor.fetchall())
            else:  # the embedded SQLite default has no arrays
                rows = dict(Account.objects.filter(user_id__in=missing).values_list("user_id",
                                                                                    "tier__requests_per_hour"))
            expires = now + settings.RATELIMIT_TIER_CACHE_SECONDS
            for uid in missing:
                has_account = uid in rows
                rph = rows.get(uid)
                if rph is None:  # no account, or an account without a tier
                    rph = self._default_limit(now)
                self.entries[uid] = (rph, has_account, expires)
                found[uid] = (rph, has_account)
        return found


tier_limits = _TierLimits()

_MAX_USER_ID = 2**63 - 1


def _as_user_id(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if isinstance(value, int) and 1 <= value <= _MAX_USER_ID:
        return value
    return None


def _user_ids(request: Any) -> list[int]:
    """The users a token request is for: its userId (body or query), each batch item's
    userId, or the signed-in user. Raises ParseError for a malformed body."""
    from consensus_tokens.auth import ServicePrincipal

    principal = request.user
    if not isinstance(principal, ServicePrincipal):
        return [principal.pk] if principal is not None and principal.pk else []
    if request.method in ("GET", "HEAD"):
        uid = _as_user_id(request.query_params.get("userId"))
        return [uid] if uid else []
    data = request.data
    if not isinstance(data, dict):
        return []
    operations = data.get("operations")
    if isinstance(operations, list):
        ids = {_as_user_id(op.get("userId")) for op in operations[:2000] if isinstance(op, dict)}
        return sorted(i for i in ids if i)
    uid = _as_user_id(data.get("userId"))
    return [uid] if uid else []


def _tokens_of(request: Any) -> int | None:
    try:
        data = request.data
    except ParseError:
        return None
    tokens = data.get("tokens") if isinstance(data, dict) else None
    return tokens if isinstance(tokens, int) and not isinstance(tokens, bool) and abs(tokens) < 2**62 else None


def _audit_refusal(request: Any, view: Any, state: LimitState, user_id: int | None) -> None:
    from metering.services import audit_record

    ctx = _request_context(request)
    action = getattr(view, "audit_action", None) or _action_for(request)
    audit_record(ctx=ctx, user_id=user_id, action=action, result="rate_limited", tokens=_tokens_of(request),
                 detail={"scope": state.scope, "limit": state.limit, "key": state.value})


def _request_context(request: Any) -> Any:
    from metering.api import request_context

    return request_context(request)


def _action_for(request: Any) -> str:
    match = getattr(request, "resolver_match", None)
    name = getattr(match, "url_name", "") or ""
    return name.removeprefix("tokens-").replace("-", "_") or "request"


class TokenRateThrottle(BaseThrottle):
    """Per user (by tier) and per service key, counted in one round trip.

    The REST framework's default throttle (settings: DEFAULT_THROTTLE_CLASSES), so
    it is configured in one place; it limits only paths under RATELIMIT_API_PREFIXES
    (the token API). It runs after authentication and permissions. The user is the
    one the call is for, so a service calling for many users spends each user's
    budget, not one shared one; the service key has its own ceiling
    (ServiceKey.requests_per_hour). A user without an account counts against the
    default tier's limit.
    """

    def allow_request(self, request, view) -> bool:
        if not settings.RATELIMIT_ENABLE or not request.path_info.startswith(settings.RATELIMIT_API_PREFIXES):
            return True
        from consensus_tokens.auth import ServicePrincipal

        specs: list[tuple[str, str, int]] = []
        principal = request.user
        if isinstance(principal, ServicePrincipal):
            specs.append(("service_key", str(principal.key.pk), principal.key.requests_per_hour))
        parse_error = None
        try:
            user_ids = _user_ids(request)
        except ParseError as error:  # counted against the key, then answered as malformed
            user_ids, parse_error = [], error
        limits = tier_limits.get(user_ids) if user_ids else {}
        specs.extend(("user", str(uid), limits[uid][0]) for uid in user_ids)
        states = limits_count(specs)
        if states is None:
            if parse_error:
                raise parse_error
            return True  # fail open
        state = binding_limit(states)
        if state is not None:
            request._request.ratelimit = state
        if parse_error:
            raise parse_error
        if state is not None and state.exceeded:
            user_id = int(state.value) if state.scope == "user" and limits[int(state.value)][1] else None
            if user_id is None and len(user_ids) == 1 and limits[user_ids[0]][1]:
                user_id = user_ids[0]
            metrics.ratelimit_refused.labels(scope=state.scope).inc()
            # Refused, it spends no other budget: a user hammering past their own limit
            # cannot use up the service key's ceiling, nor a throttled service a user's.
            counters_give_back([s.key for s in states if not s.exceeded])
            _audit_refusal(request, view, state, user_id)
            who = "this user" if state.scope == "user" else "this service key"
            raise RateLimited(
                f"Rate limit of {state.limit} requests per hour for {who} exceeded; retry in "
                f"{state.retry_after()} s.",
                extra={"scope": state.scope, "limit": state.limit, "retryAfter": state.retry_after()})
        return True


# --- per IP on sign-in and password reset --------------------------------------------------------

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
            usage = get_usage(request, group=_client_ip_group(request.path_info), key="ip", rate=rate,
                              method="POST", increment=True)
        except Exception as error:  # noqa: BLE001 - the store failing fails open
            _breaker.trip(error)
            return None
        if usage is None:
            return None
        state = LimitState(scope="ip", value=request.META.get("REMOTE_ADDR", ""), limit=usage["limit"],
                           count=usage["count"], reset_at=int(time.time()) + max(0, usage["time_left"]))
        request.ratelimit = state
        if not usage["should_limit"]:
            return None
        metrics.ratelimit_refused.labels(scope="ip").inc()
        from metering.services import RequestContext, audit_record

        action = "password_reset" if "password" in request.path_info else "login"
        audit_record(ctx=RequestContext(client_ip=request.META.get("REMOTE_ADDR") or None,
                                        user_agent=request.META.get("HTTP_USER_AGENT", ""),
                                        request_id=getattr(request, "request_id", "")),
                     user_id=None, action=action, result="rate_limited", detail={"path": request.path_info})
        message = f"Too many attempts from your address; retry in {state.retry_after()} s."
        if "application/json" in request.headers.get("Accept", ""):
            response = JsonResponse(error_body("rate_limited", message), status=429)
        else:
            response = HttpResponse(f"<!doctype html><title>Too many attempts</title><h1>Too many attempts</h1>"
                                    f"<p>{escape(message)}</p>", status=429)
        for name, value in state.headers().items():
            response[name] = value
        return response
