"""One run at a time for the periodic jobs.

On PostgreSQL a session advisory lock: taken without waiting, released when the
job ends or, if the worker dies, when its connection closes, so a crash never
leaves a job locked out. Elsewhere (the embedded SQLite default, one process)
an atomic cache add with a time-out does the same job."""
from __future__ import annotations

import uuid
import zlib
from collections.abc import Iterator
from contextlib import contextmanager

from django.core.cache import cache
from django.db import connection


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
    cache_key, token = f"alerts:job-lock:{name}", uuid.uuid4().hex
    acquired = cache.add(cache_key, token, ttl_seconds)
    try:
        yield acquired
    finally:
        if acquired and cache.get(cache_key) == token:
            cache.delete(cache_key)
