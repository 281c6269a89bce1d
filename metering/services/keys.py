"""Service API keys: random, shown once, stored as a SHA-256, revocable."""
from __future__ import annotations

import hashlib
import secrets

from django.conf import settings
from django.utils import timezone

from ..models import ServiceKey


def hash_key(raw: str) -> str:
    return hashlib.sha256(raw.encode()).hexdigest()


def service_key_create(*, name: str, scope: str = ServiceKey.Scope.CONSUME,
                       environment: str | None = None) -> tuple[ServiceKey, str]:
    """Returns the key row and the raw key, which is never stored and cannot be shown again."""
    environment = environment or settings.DEPLOY_ENVIRONMENT
    # The environment is part of the key, so a key from staging is refused in production at a glance.
    raw = f"ct_{environment[:4]}_{secrets.token_urlsafe(32)}"
    key = ServiceKey(name=name, prefix=raw[:12], hashed_key=hash_key(raw), scope=scope, environment=environment)
    key.full_clean()
    key.save()
    return key, raw


def service_key_revoke(*, key: ServiceKey) -> ServiceKey:
    if key.revoked_at is None:
        key.revoked_at = timezone.now()
        key.save(update_fields=["revoked_at"])
    return key
