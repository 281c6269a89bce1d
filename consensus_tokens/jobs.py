"""What the apps' periodic jobs share: one run at a time, and deletes in chunks.

The lock: on PostgreSQL a session advisory lock, taken without waiting, released
when the job ends or, if the worker dies, when its connection closes, so a crash
never leaves a job locked out. Elsewhere (the embedded SQLite default, one
process) an atomic cache add with a time-out does the same job. Each job is
also idempotent on its own; the lock only saves concurrent runs the work."""
from __future__ import annotations

import logging
import uuid
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, is_dataclass
from typing import Any

from django.core.cache import cache
from django.db import connection
from django.db.models import QuerySet

logger = logging.getLogger(__name__)


def _lock_id(name: str) -> int:
    # a stable signed 32-bit id in our own namespace (the first key of the two-int form)
    return zlib.crc32(name.encode()) - 2**31


@contextmanager
def job_lock(name: str, *, ttl_seconds: int = 3600) -> Iterator[bool]:
    """`with job_lock("cleanup") as acquired:` — acquired is False when another
    run holds it; that run does the work."""
    if connection.vendor == "postgresql":
        key = (7204, _lock_id(name))
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_try_advisory_lock(%s, %s)", key)
            acquired = bool(cursor.fetchone()[0])
        try:
            yield acquired
        finally:
            if acquired:
                with connection.cursor() as cursor:
                    cursor.execute("SELECT pg_advisory_unlock(%s, %s)", key)
        return
    cache_key, token = f"jobs:lock:{name}", uuid.uuid4().hex
    acquired = cache.add(cache_key, token, ttl_seconds)
    try:
        yield acquired
    finally:
        if acquired and cache.get(cache_key) == token:
            cache.delete(cache_key)


def run_locked(name: str, job: Callable[[], Any]) -> Any:
    """Run a periodic job's body under job_lock(name): "skipped" when another run
    holds it. A dataclass result comes back as a dict (a task result Celery can store)."""
    with job_lock(name) as acquired:
        if not acquired:
            logger.info("%s: another run holds the lock; skipping", name)
            return "skipped"
        result = job()
    return asdict(result) if is_dataclass(result) and not isinstance(result, type) else result


def delete_in_chunks(queryset: QuerySet, *, chunk: int = 5000) -> int:
    """Delete what `queryset` selects a chunk at a time, so no run holds a long
    lock on a big table. Returns the number of rows of its model deleted."""
    deleted = 0
    while True:
        ids = list(queryset.values_list("pk", flat=True)[:chunk])
        if not ids:
            return deleted
        deleted += queryset.model.objects.filter(pk__in=ids).delete()[1].get(queryset.model._meta.label, 0)
