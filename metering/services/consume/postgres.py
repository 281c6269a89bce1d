"""The consume on PostgreSQL: single (one statement) and batch (a fixed number of
set-based statements whatever its size), the statements in the .sql files beside this.

Same rules as the ORM path (orm.py), applied only to the plain case: known, active
operation types and providers, open periods, fresh operation ids, room under the caps,
and for a single consume no reservation and no alert threshold (or the entry into
overage) crossed. Anything else returns None having changed nothing, and the
dispatcher (dispatch.py) leaves it to the ORM path, which tells those cases apart,
refuses, replays and records threshold alerts in its transaction. Answers are built by
the contract, as the ORM path's are.

The single statement runs through prepared.fetch_one_prepared: a server-side prepared
statement, no BEGIN/COMMIT round trips outside a transaction and no health-check query;
a dropped connection is reopened and the statement run again, which is safe because it
is idempotent per operation id (if the first attempt did commit, the retry finds its
ledger row and the ORM path answers with the replay). A concurrent replay of the same
operation id hits the ledger's unique constraint and the whole statement fails,
changing nothing.
"""
from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg
from django.conf import settings
from django.db import IntegrityError, connection, transaction
from django.utils import timezone

from ...thresholds import usage_thresholds
from ..context import RequestContext
from ..notify import notify_usage, notify_usages, period_after_update
from ..prepared import fetch_one_prepared
from .contract import (MAX_BATCH, BatchItemResult, ConsumeRequest, ConsumeResult, PeriodFigures, api_time,
                       consume_body, running_bodies)


def _statement(name: str, **fragments: str) -> str:
    """A .sql file beside this module (read once, at import), without its comment lines,
    each {fragment} filled in."""
    text = (Path(__file__).parent / name).read_text()
    text = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("--"))
    for key, value in fragments.items():
        text = text.replace("{" + key + "}", value)
    return text


_ITEMS = _statement("batch_items.sql")
CONSUME_SINGLE = _statement("consume_single.sql")
CONSUME_GROUP = _statement("consume_group.sql")
BATCH_READ = _statement("batch_read.sql")
BATCH_AUDIT = _statement("batch_audit.sql", items=_ITEMS)
BATCH_WRITE = _statement("batch_write.sql", items=_ITEMS)

# Batches write one at a time (BATCH_WRITES_TAKE_TURNS, on by default): each waits for
# this transaction-scoped advisory lock before its write statement. Batches that share
# users would queue on the periods' row locks anyway, but queued there a batch locks each
# of its 1,000 rows only after another batch changed them, and PostgreSQL re-checks every
# such row (EvalPlanQual): markedly more database CPU per batch under concurrent
# connections (bench/README.md). Queued here, the write statement starts after the batch before it
# committed and finds its rows current. The cost: batches for disjoint users take turns
# too, so one database writes at most one batch per write statement (its duration bounds
# the batch throughput of a database; bench/README.md has the figures). Single consumes never take it. The
# key is the two-int4 form, (0x6374 for "ct", 1): pick another for any other use.
TAKE_TURN = "SELECT pg_advisory_xact_lock(25460, 1)"


# --- single --------------------------------------------------------------------------------------

def consume_fast(*, request: ConsumeRequest, ctx: RequestContext) -> ConsumeResult | None:
    now = timezone.now()
    params = {
        "user_id": request.user_id, "now": now, "tokens": request.tokens, "operation_type": request.operation_type,
        "provider": request.provider, "operation_id": request.operation_id, "model": request.model,
        "estimated_tokens": request.estimated_tokens, "script_class": request.script_class,
        "service_key_id": ctx.service_key_id,
        "fingerprint": request.fingerprint(), "client_ip": ctx.client_ip, "user_agent": (ctx.user_agent or "")[:300],
        "actor": ctx.actor, "request_id": ctx.request_id, "thresholds": usage_thresholds(),
    }
    try:
        row = fetch_one_prepared(CONSUME_SINGLE, params)
    except IntegrityError:
        return None  # the same operation id committed concurrently: the ORM path replays it
    if row is None:
        return None
    period_id, account_id, used, reserved, limit, cap, rate, starts_at, ends_at, tier_slug, entry_id = row
    # Committed already (or with the caller's transaction); no threshold was crossed, so
    # the receivers only count (metrics) - alerts find nothing to record.
    notify_usage(period_after_update(row[:9], now), used - request.tokens)
    figures = PeriodFigures(tier=tier_slug, limit=limit, reserved=reserved, cap=cap, overage_rate=rate,
                            period_start=starts_at, period_end=ends_at)
    body = consume_body(request=request, usage=figures.as_api(used), recorded_at=api_time(now))
    return ConsumeResult({**body, "entryId": entry_id}, replayed=False)


# --- a group of single consumes (combiner.py) ---------------------------------------------------

def consume_group_fast(items: list[tuple[ConsumeRequest, RequestContext]]) -> list[ConsumeResult | None]:
    """Single consumes that arrived together, in one statement (consume_group.sql) on this
    thread's connection, outside any transaction: each item's answer, as consume_fast would
    give it, or None where the statement left the item (the ORM path answers it). Raises
    what the database raises; nothing is recorded then, or everything was (replays)."""
    now = timezone.now()
    params = {"now": now, "thresholds": usage_thresholds(), "items": json.dumps([
        {"i": i, "u": r.user_id, "t": r.tokens, "o": r.operation_id, "ot": r.operation_type, "pv": r.provider,
         "m": r.model, "e": r.estimated_tokens, "sc": r.script_class, "f": r.fingerprint(), "k": ctx.service_key_id,
         "ip": ctx.client_ip, "ua": (ctx.user_agent or "")[:300], "ac": ctx.actor, "rq": ctx.request_id}
        for i, (r, ctx) in enumerate(items)], separators=(",", ":"))}
    connection.ensure_connection()
    with connection.wrap_database_errors, psycopg.Cursor(connection.connection) as cursor:
        cursor.execute(CONSUME_GROUP, params, prepare=True, binary=True)
        rows = cursor.fetchall()
    connection.health_check_done = True
    results: list[ConsumeResult | None] = [None] * len(items)
    recorded_at = api_time(now)
    periods: dict[int, tuple] = {}
    shared: dict[Any, str] = {}
    for i, entry_id, used, *period, tier_slug, delta in rows:
        period_id = period[0]
        if period_id not in periods:
            periods[period_id] = (period, delta, PeriodFigures(
                tier=tier_slug, limit=period[4], reserved=period[3], cap=period[5], overage_rate=period[6],
                period_start=period[7], period_end=period[8], shared=shared))
        body = consume_body(request=items[i][0], usage=periods[period_id][2].as_api(used), recorded_at=recorded_at)
        results[i] = ConsumeResult({**body, "entryId": entry_id}, replayed=False)
    # Committed; no threshold was crossed, so the receivers only count (metrics).
    notify_usages([(period_after_update(period, now), period[2] - delta) for period, delta, _ in periods.values()])
    return results


# --- batch ---------------------------------------------------------------------------------------

class _NotFast(Exception):
    """Raised inside the transaction to roll it back and leave the batch to the ORM path."""


def consume_batch_fast(*, requests: list[ConsumeRequest], ctx: RequestContext) -> list[BatchItemResult] | None:
    """A batch of fresh operations for users with open periods, none past its cap, in a
    fixed number of statements whatever its size (one read; then in one transaction: the
    audit rows, then one statement that locks the periods, updates them and writes the
    ledger rows).

    Returns None, having changed nothing, for anything else - an unknown user, operation
    type or provider, a duplicate, a reservation, a user without an account or period yet,
    a cap, a replayed or conflicting operation id (the ledger's unique index refuses it) -
    and the ORM path answers, refusals included.
    """
    if not requests or len(requests) > MAX_BATCH:
        return None
    if len({(r.user_id, r.operation_id) for r in requests}) != len(requests) or any(r.reservation_id for r in requests):
        return None
    try:
        return _batch_write(requests, ctx)
    except IntegrityError:
        return None  # an operation id recorded already or concurrently: nothing kept, the ORM path replays it


def _batch_write(requests: list[ConsumeRequest], ctx: RequestContext) -> list[BatchItemResult] | None:
    now = timezone.now()
    connection.close_if_health_check_failed()
    connection.ensure_connection()
    with connection.wrap_database_errors, psycopg.Cursor(connection.connection) as cursor:
        user_ids = sorted({r.user_id for r in requests})
        op_types = sorted({r.operation_type for r in requests})
        providers = sorted({r.provider for r in requests if r.provider})
        cursor.execute(BATCH_READ, {"user_ids": _int_array(user_ids), "now": now, "op_types": op_types,
                                    "providers": providers}, prepare=True)
        rows = cursor.fetchall()
        if (len(rows) != len(user_ids) or rows[0][4] != len(op_types) or rows[0][5] != len(providers)
                or any(row[3] is None for row in rows)):
            return None
        found = {user_id: (account_id, tier_slug, period_id) for user_id, account_id, tier_slug, period_id, _, _ in rows}
        period_ids = [found[r.user_id][2] for r in requests]
        items = json.dumps([
            {"i": i, "u": r.user_id, "a": account_id, "p": period_id, "t": r.tokens, "o": r.operation_id,
             "ot": r.operation_type, "pv": r.provider, "m": r.model, "e": r.estimated_tokens, "sc": r.script_class,
             "f": r.fingerprint(),
             "tr": tier_slug or ""}
            for i, (r, (account_id, tier_slug, period_id)) in enumerate(zip(requests, (found[r.user_id] for r in requests)))
        ], separators=(",", ":"))
        common = {"items": items, "service_key_id": ctx.service_key_id, "now": now, "client_ip": ctx.client_ip,
                  "user_agent": (ctx.user_agent or "")[:300], "actor": ctx.actor, "request_id": ctx.request_id}
        periods = len(set(period_ids))
        try:
            with transaction.atomic():
                cursor.execute(BATCH_AUDIT, common, prepare=True)
                # Both statements leave in one round trip: once the turn comes, the write
                # runs at once (pipeline mode), on a snapshot taken after the batch before
                # it committed.
                with connection.connection.pipeline():
                    if settings.BATCH_WRITES_TAKE_TURNS:
                        cursor.execute(TAKE_TURN, prepare=True)
                    # binary results: psycopg's C loaders for the timestamps and rates
                    cursor.execute(BATCH_WRITE, common, prepare=True, binary=True)
                rows = cursor.fetchall()
                changed = {row[2]: row for row in rows}
                if len(changed) != periods:
                    raise _NotFast  # a cap: the ORM path names the item
                # the alerts record what this batch crossed in its transaction; nothing else
                # runs between the write and the commit, while the periods are locked
                alias = connection.alias
                notify_usages([(period_after_update(row[2:11], now, alias), row[4] - row[11])
                               for row in changed.values()])
        except _NotFast:
            return None
    after = {pk: row[2:11] for pk, row in changed.items()}
    delta = {pk: row[11] for pk, row in changed.items()}
    entry_ids = {(row[3], row[1]): row[0] for row in rows}
    return _answers(requests, now, found, period_ids, after, delta, entry_ids)


def _int_array(values) -> str:
    """A bigint[] as PostgreSQL's text literal: far cheaper to build than psycopg's
    element-by-element encoding of a Python list."""
    return "{" + ",".join(map(str, values)) + "}"


def _answers(requests: list[ConsumeRequest], now: datetime, found, period_ids: list[int], after,
             delta: dict[int, int], entry_ids: dict[tuple[int, str], int]) -> list[BatchItemResult]:
    """Each item's answer, as a replay (contract.stored_body) will give it: its usage right
    after it, as batch_write.sql stored it."""
    tiers = {period_id: tier_slug for _, tier_slug, period_id in found.values()}
    shared: dict[Any, str] = {}
    figures = {pk: PeriodFigures(tier=tiers[pk], limit=limit, reserved=reserved, cap=cap, overage_rate=rate,
                                 period_start=starts_at, period_end=ends_at, shared=shared)
               for pk, (_, _, _, reserved, limit, cap, rate, starts_at, ends_at) in after.items()}
    used_before = {pk: row[2] - delta[pk] for pk, row in after.items()}
    bodies = running_bodies(zip(requests, period_ids), figures, used_before, api_time(now))
    results = []
    for i, (r, period_id, body) in enumerate(zip(requests, period_ids, bodies)):
        body["entryId"] = entry_ids[(after[period_id][1], r.operation_id)]
        results.append(BatchItemResult(i, body, replayed=False))
    return results
