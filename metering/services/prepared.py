"""One prepared statement on Django's PostgreSQL connection, in one round trip.

A plain psycopg cursor over Django's connection (so inside the caller's
transaction, if any, and with Django's error wrapping), server-side prepared
(PostgreSQL plans it once per connection), and without Django's per-request
health-check query: if a reused connection turns out to be broken, the statement
runs once more on a new one. Only for statements that are safe to run twice: a
read, or a write that is idempotent (the consume statement, per operation id).
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import psycopg
from django.db import InterfaceError, OperationalError, connection, transaction


def fetch_one_prepared(sql: str, params: dict[str, Any]) -> tuple | None:
    for attempt in (1, 2):
        reused = connection.connection is not None
        try:
            connection.ensure_connection()
            # In the caller's transaction, a savepoint, so an error leaves it usable.
            scope = transaction.atomic() if connection.in_atomic_block else nullcontext()
            # wrap_database_errors: psycopg's errors become Django's, and a broken
            # connection is noticed and closed at the end of the request.
            with scope, connection.wrap_database_errors, psycopg.Cursor(connection.connection) as cursor:
                cursor.execute(sql, params, prepare=True)
                row = cursor.fetchone()
            connection.health_check_done = True  # it just answered: Django need not ask again
            return row
        except (OperationalError, InterfaceError):
            # A persistent connection the server dropped (restart, idle timeout): what
            # CONN_HEALTH_CHECKS would have caught with a query of its own before this one.
            if attempt == 2 or not reused or connection.in_atomic_block:
                raise
            connection.close()
    return None
