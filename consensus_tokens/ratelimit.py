"""Rate limits: per user by tier, per service key, per IP on sign-in and password reset.

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
from django.db import connection, transaction
from django.http import HttpResponse, JsonResponse
from django.utils.html import escape
from django_ratelimit.core import get_usage
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


def limits_changed() -> None:
    """Something that decides a user's request limit changed (a tier's requests_per_hour,
    an account's tier, the default tier): drop this process's cached limits and bump the
    limits version, so every other worker drops its own at its next counted request.
    Call it after the change is committed (the receivers below do), or other workers
    may read the old rows again."""
    tier_limits.clear()
    try:
        client = _redis_client(caches[settings.RATELIMIT_USE_CACHE])
        if client is not None:
            client.incr(_limits_version_key())
    except Exception as error:  # noqa: BLE001 - the change stands; workers catch up within the TTL
        logger.warning("rate limit store unreachable, other workers keep their cached limits for up to "
                       "RATELIMIT_TIER_CACHE_SECONDS: %s", error)


def _limit_entries(specs: list[tuple[str, Any]], period: int, ts: int) -> list[tuple[str, int, int]]:
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

class _TierLimits:
    """user id -> (requests per hour, has an account), kept in this process while the
    limits version that counting returns stays the one they were read under
    (limits_changed() bumps it), and RATELIMIT_TIER_CACHE_SECONDS at most: a safety net
    for a change made without a signal or a bump lost to a Redis outage, and the only
    bound with local memory, where there is no shared version.

    Only users with an account are kept: one without is looked up again on its next
    request (which goes to the database anyway), so a new account is seen at once and
    creating one, which happens on every user's first request, needs no bump."""

    MAX_ENTRIES = 100_000

    def __init__(self) -> None:
        self.entries: dict[int, tuple[int, bool, float]] = {}  # uid -> (per hour, has account, expiry)
        self.default: tuple[int, float] | None = None
        self.version: int | None = None  # the limits version the entries were read under

    def clear(self) -> None:
        self.entries.clear()
        self.default = None

    def _default_limit(self, now: float) -> int:
        if self.default is None or self.default[1] <= now:
            from metering.models import Tier

            rph = Tier.objects.filter(slug=settings.DEFAULT_TIER).values_list("requests_per_hour", flat=True).first()
            self.default = (100 if rph is None else rph, now + settings.RATELIMIT_TIER_CACHE_SECONDS)
        return self.default[0]

    def get(self, user_ids: list[int], version: int | None = None) -> dict[int, tuple[int, bool, float]]:
        """Each user's (requests per hour, has an account, ...); `version` is the limits
        version read with this request's counts (after them, so a change that bumped it
        before is seen)."""
        if version != self.version:
            self.clear()
            self.version = version
        now = time.monotonic()
        entries = self.entries
        found: dict[int, tuple[int, bool, float]] = {}
        missing = []
        for uid in user_ids:
            entry = entries.get(uid)
            if entry is not None and entry[2] > now:
                found[uid] = entry
            else:
                missing.append(uid)
        if missing:
            rows = self._read(missing)
            # Another thread may have seen a newer version meanwhile: then what was read
            # here may predate the change, so it is used for this request only.
            keep = self.version == version
            if keep and len(entries) > self.MAX_ENTRIES:
                entries.clear()
            expires = now + settings.RATELIMIT_TIER_CACHE_SECONDS
            for uid in missing:
                if uid in rows:
                    rph = rows[uid]
                    entry = (self._default_limit(now) if rph is None else rph, True, expires)  # no tier: default
                    if keep:
                        entries[uid] = entry
                else:  # no account (yet): the default tier's limit
                    entry = (self._default_limit(now), False, 0.0)
                found[uid] = entry
        return found

    @staticmethod
    def _read(user_ids: list[int]) -> dict[int, int | None]:
        from metering.models import Account, Tier

        if connection.vendor == "postgresql":
            # Plain SQL: the ORM's query building cost several times the query itself (bench/).
            with connection.cursor() as cursor:
                cursor.execute(f"SELECT a.user_id, t.requests_per_hour FROM {Account._meta.db_table} a "
                               f"LEFT JOIN {Tier._meta.db_table} t ON t.id = a.tier_id "
                               "WHERE a.user_id = ANY(%s)", [user_ids])
                return dict(cursor.fetchall())
        # the embedded SQLite default has no arrays
        return dict(Account.objects.filter(user_id__in=user_ids).values_list("user_id", "tier__requests_per_hour"))


tier_limits = _TierLimits()

# The fields of each model that decide a user's limit: a save touching none of them
# (an account's status or holds, a tier's prices) leaves the cached limits alone.
_LIMIT_FIELDS = {"Tier": {"requests_per_hour", "slug"}, "Account": {"tier", "tier_id"}}


def _on_limit_row_saved(sender, instance, created=False, update_fields=None, using="default", **kwargs) -> None:
    if created and sender._meta.object_name == "Account":
        return  # accounts without a row are never cached (_TierLimits)
    if update_fields is not None and not _LIMIT_FIELDS[sender._meta.object_name].intersection(update_fields):
        return
    _publish_change(using)


def _on_limit_row_deleted(sender, instance, using="default", **kwargs) -> None:
    _publish_change(using)


def _publish_change(using: str) -> None:
    limits_changed()  # at once, for this process (and a test inside one transaction)
    if transaction.get_connection(using).in_atomic_block:
        # and again once committed: a worker that re-read the rows in between read the old ones
        transaction.on_commit(limits_changed, using=using)


def connect_receivers() -> None:
    """Tier and Account changes bump the limits version (QuerySet.update() sends no
    signal: code that updates these fields that way calls limits_changed() itself)."""
    from django.db.models.signals import post_delete, post_save

    from metering.models import Account, Tier

    for model in (Tier, Account):
        post_save.connect(_on_limit_row_saved, sender=model, dispatch_uid=f"ratelimit.limits.{model.__name__}.save")
        post_delete.connect(_on_limit_row_deleted, sender=model,
                            dispatch_uid=f"ratelimit.limits.{model.__name__}.delete")

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

        principal = request.user
        key = principal.key if isinstance(principal, ServicePrincipal) else None
        parse_error = None
        try:
            user_ids = _user_ids(request)
        except ParseError as error:  # counted against the key, then answered as malformed
            user_ids, parse_error = [], error
        ts = int(time.time())
        # The service key first, then the users: ties go to the key, as they always did.
        specs = [("service_key", key.pk)] if key is not None else []
        specs.extend(("user", uid) for uid in user_ids)
        entries = _limit_entries(specs, HOUR, ts)
        hit = counters_hit([(k, period) for k, period, _ in entries]) if entries else None
        if hit is None:
            if parse_error:
                raise parse_error
            return True  # fail open (or nothing to count)
        counts, version = hit
        # The limits are needed only now, after counting: its reply says whether the
        # limits this process keeps are still current.
        limits = tier_limits.get(user_ids, version) if user_ids else {}
        per_hour = [key.requests_per_hour] if key is not None else []
        per_hour.extend(limits[uid][0] for uid in user_ids)
        i = _binding(specs, per_hour, counts, entries)
        state = LimitState(scope=specs[i][0], value=str(specs[i][1]), limit=per_hour[i], count=counts[i],
                           reset_at=entries[i][2], key=entries[i][0])
        request._request.ratelimit = state
        if parse_error:
            raise parse_error
        if state.exceeded:
            user_id = int(state.value) if state.scope == "user" and limits[int(state.value)][1] else None
            if user_id is None and len(user_ids) == 1 and limits[user_ids[0]][1]:
                user_id = user_ids[0]
            metrics.ratelimit_refused.labels(scope=state.scope).inc()
            # Refused, it spends no other budget: a user hammering past their own limit
            # cannot use up the service key's ceiling, nor a throttled service a user's.
            counters_give_back([entry[0] for entry, n, limit in zip(entries, counts, per_hour) if n <= limit])
            _audit_refusal(request, view, state, user_id)
            who = "this user" if state.scope == "user" else "this service key"
            raise RateLimited(
                f"Rate limit of {state.limit} requests per hour for {who} exceeded; retry in "
                f"{state.retry_after()} s.",
                extra={"scope": state.scope, "limit": state.limit, "retryAfter": state.retry_after()})
        return True


def _binding(specs: list[tuple[str, Any]], limits: list[int], counts: list[int],
             entries: list[tuple[str, int, int]]) -> int:
    """The limit to report (its index): an exceeded one if any (the latest to reset),
    else the one with least room, a user's before the key's. Works on lists, so a
    1,000-user batch builds one LimitState, not 1,000."""
    exceeded = [i for i, (n, limit) in enumerate(zip(counts, limits)) if n > limit]
    if exceeded:
        return max(exceeded, key=lambda i: entries[i][2])
    return min(range(len(counts)), key=lambda i: (max(0, limits[i] - counts[i]), specs[i][0] != "user"))


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
