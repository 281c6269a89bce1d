"""Health endpoints for the load balancer and docker-compose healthchecks.

/health/live: the process is up and answering (no dependencies checked, so a
database outage does not get every web process restarted).
/health/ready: the database, Redis and the Celery broker answer; 503 with the
error shape and the failing checks when any does not. The body names each check
and its state only ("ok", "failing", "not configured", "not used ..."), never a host, port or
exception text: the load balancer and anyone who can reach it see it. What went
wrong is logged (`readiness check redis failed: ...`).
"""
from __future__ import annotations

import logging
import time

from django.conf import settings
from django.db import connection
from django.http import JsonResponse
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_safe

from consensus_tokens.errors import error_body

logger = logging.getLogger(__name__)

# Each dependency gets this long to answer.
CHECK_TIMEOUT_SECONDS = 1.0


def check_database() -> None:
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
        cursor.fetchone()


def check_redis() -> str | None:
    if not settings.REDIS_URL:
        return "not configured"
    import redis

    client = redis.Redis.from_url(settings.REDIS_URL, socket_connect_timeout=CHECK_TIMEOUT_SECONDS,
                                  socket_timeout=CHECK_TIMEOUT_SECONDS)
    try:
        client.ping()
    finally:
        client.close()
    return None


def check_broker() -> str | None:
    if settings.CELERY_TASK_ALWAYS_EAGER or settings.CELERY_BROKER_URL.startswith("memory://"):
        return "not used (tasks run in-process)"
    from consensus_tokens.celery import app

    with app.connection_for_write() as conn:
        conn.ensure_connection(max_retries=1, interval_start=0, interval_step=0, timeout=CHECK_TIMEOUT_SECONDS)
    return None


CHECKS = {"database": check_database, "redis": check_redis, "broker": check_broker}


@never_cache
@require_safe
def live(request):
    return JsonResponse({"status": "ok"})


@never_cache
@require_safe
def ready(request):
    checks: dict[str, str] = {}
    for name, check in CHECKS.items():
        start = time.perf_counter()
        try:
            note = check()
        except Exception as error:  # noqa: BLE001 - any failure means not ready
            logger.warning("readiness check %s failed: %s: %s", name, type(error).__name__, error,
                           extra={"check": name, "duration_ms": round((time.perf_counter() - start) * 1000, 1)})
            checks[name] = "failing"
        else:
            checks[name] = note or "ok"  # a note is fixed text: "not configured", "not used (...)"
    failing = [name for name, state in checks.items() if state == "failing"]
    if failing:
        if "database" in failing:
            connection.close_if_unusable_or_obsolete()
        body = error_body("not_ready", f"Not ready: {', '.join(failing)} failing.")
        return JsonResponse({**body, "status": "unavailable", "checks": checks}, status=503)
    return JsonResponse({"status": "ok", "checks": checks})
