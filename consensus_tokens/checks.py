"""The kernel's system checks (registered in OpsConfig.ready)."""
from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.checks import Error, Tags, register


@register(Tags.security, deploy=True)
def check_metrics_protected(app_configs: Any = None, **kwargs: Any) -> list[Error]:
    """A deployment serves /metrics with a token, or public because someone said so."""
    if settings.METRICS_TOKEN or settings.METRICS_PUBLIC:
        return []
    return [Error(
        "/metrics has no token: it refuses every scrape.",
        hint="Set METRICS_TOKEN (scrapes send `Authorization: Bearer <token>`), or METRICS_PUBLIC=true to serve "
             "metrics without one on purpose (only where the endpoint is off the public network).",
        id="consensus_tokens.E001")]
