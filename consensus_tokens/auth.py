"""`Authorization: Api-Key <key>` for backend services."""
from __future__ import annotations

from datetime import timedelta

from django.conf import settings
from django.utils import timezone
from rest_framework import authentication, exceptions, permissions

from metering.models import ServiceKey
from metering.services.keys import hash_key

# last_used_at is written at most this often per key, to keep writes off the hot path.
LAST_USED_RESOLUTION = timedelta(minutes=1)


class ServicePrincipal:
    """The authenticated caller when a service key is used."""

    is_authenticated = True
    is_active = True
    is_staff = False
    pk = None

    def __init__(self, key: ServiceKey) -> None:
        self.key = key

    def __str__(self) -> str:
        return f"service:{self.key.name}"


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
        key = ServiceKey.objects.filter(hashed_key=hash_key(raw)).first()
        if key is None or key.revoked_at is not None:
            raise exceptions.AuthenticationFailed("Invalid or revoked API key.")
        if key.environment != settings.DEPLOY_ENVIRONMENT:
            raise exceptions.AuthenticationFailed("This API key belongs to another environment.")
        now = timezone.now()
        if key.last_used_at is None or now - key.last_used_at > LAST_USED_RESOLUTION:
            ServiceKey.objects.filter(pk=key.pk).update(last_used_at=now)
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

