"""`Authorization: Api-Key <key>` for backend services.

Every service request authenticates, so the key row is kept in this process for
SERVICE_KEY_CACHE_SECONDS (default 5): a revocation takes effect in every worker
within that time, and at once in the process that saved it (post_save evicts).
Unknown keys are never cached, so a new key works immediately.
"""
from __future__ import annotations

import threading
import time
from datetime import timedelta

from django.conf import settings
from django.db.models.signals import post_delete, post_save
from django.utils import timezone
from drf_spectacular.extensions import OpenApiAuthenticationExtension
from rest_framework import authentication, exceptions, permissions

from .models import ServiceKey
from .principals import ServicePrincipal
from .services.keys import hash_key

# last_used_at is written at most this often per key, to keep writes off the hot path.
LAST_USED_RESOLUTION = timedelta(minutes=1)
# Bounds the cache if many different keys are in use; it is simply emptied when full.
_CACHE_MAX_KEYS = 1000

_keys: dict[str, tuple[float, ServiceKey]] = {}  # hashed key -> (monotonic expiry, row)
_last_used_written: dict[int, float] = {}  # key id -> monotonic time this process last wrote last_used_at
_lock = threading.Lock()
# Bumped by every eviction: a row read before one (another thread, a revoke) is not cached
# after it, so a revoked key stops working in this process at once under threaded workers.
_evictions = 0


def _cache_seconds() -> float:
    return float(settings.SERVICE_KEY_CACHE_SECONDS)


def service_key_lookup(hashed: str) -> ServiceKey | None:
    """The key row for a hashed key, from this process's cache while it is fresh."""
    now = time.monotonic()
    hit = _keys.get(hashed)
    if hit is not None and hit[0] > now:
        return hit[1]
    evictions = _evictions
    key = ServiceKey.objects.filter(hashed_key=hashed).first()
    ttl = _cache_seconds()
    if key is not None and ttl > 0:
        with _lock:
            if evictions != _evictions:
                return key  # read before an eviction: good for this request only
            if len(_keys) >= _CACHE_MAX_KEYS:
                _keys.clear()
            _keys[hashed] = (now + ttl, key)
    else:
        _keys.pop(hashed, None)
    return key


def service_key_forget(*, hashed: str | None = None) -> None:
    """Drop one key (or all) from this process's cache."""
    global _evictions
    with _lock:
        _evictions += 1
        if hashed is None:
            _keys.clear()
        else:
            _keys.pop(hashed, None)


def _evict(sender, instance: ServiceKey, **kwargs) -> None:
    service_key_forget(hashed=instance.hashed_key)


post_save.connect(_evict, sender=ServiceKey, dispatch_uid="service_key_cache_evict_save")
post_delete.connect(_evict, sender=ServiceKey, dispatch_uid="service_key_cache_evict_delete")


def _touch(key: ServiceKey) -> None:
    """Write last_used_at at most once a minute per key and process."""
    mono = time.monotonic()
    written = _last_used_written.get(key.pk)
    if written is not None and mono - written < LAST_USED_RESOLUTION.total_seconds():
        return
    now = timezone.now()
    if written is None and key.last_used_at is not None and now - key.last_used_at < LAST_USED_RESOLUTION:
        _last_used_written[key.pk] = mono - (now - key.last_used_at).total_seconds()
        return
    ServiceKey.objects.filter(pk=key.pk).update(last_used_at=now)
    _last_used_written[key.pk] = mono


class ServiceKeyAuthentication(authentication.BaseAuthentication):
    keyword = "Api-Key"

    def authenticate(self, request):
        header = authentication.get_authorization_header(request).decode("latin-1")
        if not header:
            return None
        scheme, _, raw = header.partition(" ")
        if scheme != self.keyword:
            return None
        raw = raw.strip()
        if not raw:
            raise exceptions.AuthenticationFailed("Empty API key.")
        key = service_key_lookup(hash_key(raw))
        if key is None or key.revoked_at is not None:
            raise exceptions.AuthenticationFailed("Invalid or revoked API key.")
        if key.environment != settings.DEPLOY_ENVIRONMENT:
            raise exceptions.AuthenticationFailed("This API key belongs to another environment.")
        _touch(key)
        return ServicePrincipal(key), key

    def authenticate_header(self, request) -> str:
        return self.keyword


class CanReadFor(permissions.BasePermission):
    """A service key (any scope), or a signed-in user asking about themselves."""

    def has_permission(self, request, view) -> bool:
        return bool(request.user and request.user.is_authenticated)


class CanConsume(permissions.BasePermission):
    """Only service keys with the consume scope change balances."""

    message = "This endpoint needs a service key with the 'consume' scope."

    def has_permission(self, request, view) -> bool:
        return isinstance(request.user, ServicePrincipal) and request.user.key.scope == ServiceKey.Scope.CONSUME


class ServiceKeyScheme(OpenApiAuthenticationExtension):
    """The service-key scheme in the OpenAPI schema (drf-spectacular finds it by its target)."""

    target_class = "metering.auth.ServiceKeyAuthentication"
    name = "ServiceKey"

    def get_security_definition(self, auto_schema):
        return {"type": "apiKey", "in": "header", "name": "Authorization",
                "description": "`Api-Key <key>`: a backend service's key (scope `read` or `consume`)."}
