"""The token API's rate limits: per user by their tier's requests_per_hour and per service key
(ServiceKey.requests_per_hour), all of a request's limits counted with one Redis command
(consensus_tokens/ratelimit.py counts; this module decides whose limits and how many).

The users' limits are kept in this process until a Tier or Account save bumps the shared
limits version (receivers below), RATELIMIT_TIER_CACHE_SECONDS at most.
"""
from __future__ import annotations

import time
from typing import Any

from django.conf import settings
from django.db import connection, transaction
from django.db.models.signals import post_delete, post_save
from rest_framework.exceptions import ParseError
from rest_framework.throttling import BaseThrottle

from consensus_tokens import metrics
from consensus_tokens.client_ip import client_ip
from consensus_tokens.ratelimit import (
    HOUR,
    ip_rate_limited,
    LimitState,
    RateLimited,
    counters_give_back,
    counters_hit,
    limit_entries,
    limits_changed,
    register_local_limits,
)

from .models import Account, Tier
from .principals import ServicePrincipal
from .services import RequestContext, audit_record
from .services.context import request_context


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

    class _State:
        """The entries read under one limits version. Swapped whole, never emptied in place:
        a request thread keeps the state it started with, so rows it read before a change
        can only land in a state that is no longer in use (threaded workers)."""

        __slots__ = ("default", "entries", "version")

        def __init__(self, version: int | None) -> None:
            self.version = version
            self.entries: dict[int, tuple[int, bool, float]] = {}  # uid -> (per hour, has account, expiry)
            self.default: tuple[int, float] | None = None

    def __init__(self) -> None:
        self.state = self._State(None)

    def clear(self) -> None:
        self.state = self._State(self.state.version)

    def _current(self, version: int | None) -> "_TierLimits._State":
        """The state to read and fill for a request that counted under `version`."""
        state = self.state
        if version == state.version:
            return state
        # Any other version replaces the state, a lower one too: Redis may have restarted
        # and counts versions from 1 again. Rows a thread read under one version only ever
        # serve requests that counted under that version.
        state = self.state = self._State(version)
        return state

    @staticmethod
    def _default_limit(state: "_TierLimits._State", now: float) -> int:
        default = state.default
        if default is None or default[1] <= now:
            rph = Tier.objects.filter(slug=settings.DEFAULT_TIER).values_list("requests_per_hour", flat=True).first()
            default = state.default = (100 if rph is None else rph, now + settings.RATELIMIT_TIER_CACHE_SECONDS)
        return default[0]

    def get(self, user_ids: list[int], version: int | None = None) -> dict[int, tuple[int, bool, float]]:
        """Each user's (requests per hour, has an account, ...); `version` is the limits
        version read with this request's counts (after them, so a change that bumped it
        before is seen)."""
        state = self._current(version)
        now = time.monotonic()
        entries = state.entries
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
            if len(entries) > self.MAX_ENTRIES:
                entries.clear()
            expires = now + settings.RATELIMIT_TIER_CACHE_SECONDS
            for uid in missing:
                if uid in rows:
                    rph = rows[uid]
                    entry = (self._default_limit(state, now) if rph is None else rph, True, expires)  # no tier: default
                    entries[uid] = entry
                else:  # no account (yet): the default tier's limit
                    entry = (self._default_limit(state, now), False, 0.0)
                found[uid] = entry
        return found

    @staticmethod
    def _read(user_ids: list[int]) -> dict[int, int | None]:
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


def _audit_ip_refusal(sender, request, action: str, **kwargs) -> None:
    audit_record(ctx=RequestContext(client_ip=client_ip(request) or None,
                                    user_agent=request.META.get("HTTP_USER_AGENT", ""),
                                    request_id=getattr(request, "request_id", "")),
                 user_id=None, action=action, result="rate_limited", detail={"path": request.path_info})


def connect_receivers() -> None:
    """Tier and Account changes bump the limits version (QuerySet.update() sends no
    signal: code that updates these fields that way calls limits_changed() itself); a
    sign-in refused for its address is audited."""
    for model in (Tier, Account):
        post_save.connect(_on_limit_row_saved, sender=model, dispatch_uid=f"ratelimit.limits.{model.__name__}.save")
        post_delete.connect(_on_limit_row_deleted, sender=model,
                            dispatch_uid=f"ratelimit.limits.{model.__name__}.delete")
    ip_rate_limited.connect(_audit_ip_refusal, dispatch_uid="ratelimit.ip_refusal_audit")
    register_local_limits(tier_limits.clear)


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
    ctx = request_context(request)
    action = getattr(view, "audit_action", None) or _action_for(request)
    audit_record(ctx=ctx, user_id=user_id, action=action, result="rate_limited", tokens=_tokens_of(request),
                 detail={"scope": state.scope, "limit": state.limit, "key": state.value})


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
        entries = limit_entries(specs, HOUR, ts)
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
