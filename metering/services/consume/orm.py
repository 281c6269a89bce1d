"""The consume through the ORM, single and batch: the path that tells every case apart
(unknown names, first use, replays, conflicts, reservations, the cap, alert thresholds
crossed) and answers alike with the contract's body. The dispatcher (dispatch.py) sends
here whatever the PostgreSQL statements (postgres.py) leave; this never calls them.

Every change to a period's counters is one conditional UPDATE (or, for a batch, one
UPDATE of periods locked and checked first) plus the ledger rows that explain it, in
one transaction.
"""
from __future__ import annotations

from collections import defaultdict
from datetime import datetime
from typing import Any

from django.contrib.auth import get_user_model
from django.db import IntegrityError, transaction
from django.db.models import Case, F, IntegerField, Value, When
from django.utils import timezone

from consensus_tokens.errors import ApplicationError

from ...errors import OperationIdConflict, ReservationExpired, TokenCapExceeded
from ...models import Account, AuditLog, LedgerEntry, OperationType, Provider, Reservation, UsagePeriod
from ..accounts import account_for_user, period_current, periods_current
from ..audit import audit_record, audit_row, known_user_id
from ..context import RequestContext
from ..notify import notify_usage, notify_usages
from ..usage import (operation_type_get, period_available, provider_check, reservation_hold_release, reservation_of,
                     usage_of, within_cap)
from .contract import (MAX_BATCH, BatchItemResult, BatchRefused, ConsumeRequest, ConsumeResult, PeriodFigures,
                       api_time, consume_body, replay_body, running_bodies)

# --- single --------------------------------------------------------------------------------------


def consume_orm(*, request: ConsumeRequest, ctx: RequestContext) -> ConsumeResult:
    operation_type_get(request.operation_type)
    if request.provider:
        provider_check(request.provider)
    account = account_for_user(user_id=request.user_id)
    replay = _replay(account, request, ctx)
    if replay is not None:
        return replay
    period = period_current(account=account)
    try:
        with transaction.atomic():
            result = _record_consumption(account=account, period=period, request=request, ctx=ctx)
    except (IntegrityError, TokenCapExceeded, ReservationExpired):
        # The same operation id recorded concurrently: everything above rolled back.
        # The refusal may be that very request's doing (it filled the cap, or settled
        # the reservation) - then this is its replay, not a refusal.
        replay = _replay(account, request, ctx)
        if replay is None:
            raise
        return replay
    return result


def _replay(account: Account, request: ConsumeRequest, ctx: RequestContext) -> ConsumeResult | None:
    entry = (LedgerEntry.objects.filter(account=account, operation_id=request.operation_id,
                                        kind=LedgerEntry.Kind.CONSUMPTION)
             .only("pk", "fingerprint", "response").first())
    if entry is None:
        return None
    if entry.fingerprint != request.fingerprint():
        audit_record(ctx=ctx, user_id=request.user_id, action="consume", result="operation_id_conflict",
                     tokens=request.tokens, operation_type=request.operation_type, operation_id=request.operation_id)
        raise OperationIdConflict(f"Operation {request.operation_id} was already recorded with a different body.")
    audit_record(ctx=ctx, user_id=request.user_id, action="consume", result="replayed", tokens=request.tokens,
                 operation_type=request.operation_type, operation_id=request.operation_id)
    return ConsumeResult(replay_body(response=entry.response, request=request, entry_id=entry.pk), replayed=True)


def _record_consumption(*, account: Account, period: UsagePeriod, request: ConsumeRequest,
                        ctx: RequestContext) -> ConsumeResult:
    now = timezone.now()
    reservation, reserved_delta = None, 0
    if request.reservation_id:
        reservation, reserved_delta = _hold_to_settle(account, period, request, ctx, now)
    _charge(period, request, reserved_delta, settling=reservation is not None)
    period.refresh_from_db(fields=["used", "reserved", "token_limit", "cap", "overage_rate"])
    tier_slug = account.tier.slug if account.tier else None
    body = consume_body(request=request, usage=usage_of(period, tier_slug).as_api(), recorded_at=api_time(now))
    entry = LedgerEntry(account=account, period=period, kind=LedgerEntry.Kind.CONSUMPTION,
                        used_delta=request.tokens, reserved_delta=reserved_delta, operation_id=request.operation_id,
                        operation_type=request.operation_type, provider=request.provider, model=request.model,
                        estimated_tokens=request.estimated_tokens, actual_tokens=request.tokens,
                        reservation=reservation, service_key_id=ctx.service_key_id,
                        fingerprint=request.fingerprint(), response=body, created_at=now)
    entry.save()
    if reservation is not None and reservation.status == Reservation.Status.HELD:
        reservation.status = Reservation.Status.SETTLED
        reservation.finished_at = now
        reservation.save(update_fields=["status", "finished_at"])
    audit_record(ctx=ctx, user_id=request.user_id, action="consume", result="recorded", tokens=request.tokens,
                 operation_type=request.operation_type, operation_id=request.operation_id)
    notify_usage(period, period.used - request.tokens)
    return ConsumeResult({**body, "entryId": entry.pk}, replayed=False)


def _hold_to_settle(account: Account, period: UsagePeriod, request: ConsumeRequest, ctx: RequestContext,
                    now: datetime) -> tuple[Reservation, int]:
    """The hold this consume settles (locked), and what settling it frees in `period`."""
    reservation = reservation_of(account, request.reservation_id, lock=True)
    # past its expiry a hold is expired whether or not the cleanup job has run yet,
    # so the answer does not depend on that job's timing
    status = Reservation.Status.EXPIRED if reservation.expires_at <= now else reservation.status
    if status != Reservation.Status.HELD:
        raise ReservationExpired(f"Reservation {request.reservation_id} is {status}; consume without reservationId.",
                                 extra={"status": status})
    if reservation.period_id == period.pk:
        return reservation, -reservation.tokens
    # held in a period that has ended: free it there, charge this one
    reservation_hold_release(reservation, ctx=ctx, status=Reservation.Status.SETTLED)
    return reservation, 0


def _charge(period: UsagePeriod, request: ConsumeRequest, reserved_delta: int, *, settling: bool) -> None:
    """Add the tokens to the period: within its cap, or, settling a hold (the operation
    already ran), the actual tokens whatever the cap says."""
    if settling:
        changed = UsagePeriod.objects.filter(pk=period.pk).update(
            used=F("used") + request.tokens, reserved=F("reserved") + reserved_delta)
    else:
        changed = UsagePeriod.objects.filter(within_cap(request.tokens), pk=period.pk).update(
            used=F("used") + request.tokens)
    if not changed:
        raise TokenCapExceeded("This operation would pass the user's token cap.",
                               extra={"available": period_available(period), "cap": period.cap})


def consume_refused(*, request: ConsumeRequest, ctx: RequestContext, error: ApplicationError) -> None:
    """Audit a refused consume (outside the rolled-back transaction)."""
    user_id = known_user_id(request.user_id)
    audit_record(ctx=ctx, user_id=user_id, action="consume", result=error.code, tokens=request.tokens,
                 operation_type=request.operation_type, operation_id=request.operation_id,
                 detail={} if user_id else {"userId": request.user_id})


# --- batch: all or nothing, in a constant number of queries whatever its size -------------------

def consume_batch_orm(*, requests: list[ConsumeRequest], ctx: RequestContext) -> list[BatchItemResult]:
    try:
        return _consume_batch(requests, ctx)
    except IntegrityError:
        # an operation id in the batch was recorded concurrently; nothing was kept,
        # and a second pass sees it as a replay.
        return _consume_batch(requests, ctx)


def _consume_batch(requests: list[ConsumeRequest], ctx: RequestContext) -> list[BatchItemResult]:
    _refuse_malformed(requests)
    _refuse_unknown_names(requests)
    accounts = _accounts_for(requests)
    now = timezone.now()
    periods = _current_periods(accounts, now)
    replayed, fresh, replay_audits = _replays_and_fresh(requests, accounts, ctx)
    delta: dict[int, int] = defaultdict(int)
    for _, r in fresh:
        delta[periods[r.user_id].pk] += r.tokens
    with transaction.atomic():
        if delta:
            _lock_within_caps(delta, fresh, periods)
            amount = Case(*[When(pk=pk, then=Value(d)) for pk, d in delta.items()], output_field=IntegerField())
            UsagePeriod.objects.filter(pk__in=list(delta)).update(used=F("used") + amount)
        recorded = _record_fresh(fresh, accounts, periods, delta, now, ctx, replay_audits)
    results = {**replayed, **recorded}
    return [results[i] for i in range(len(requests))]


def _refuse_malformed(requests: list[ConsumeRequest]) -> None:
    """A batch holds 1 to MAX_BATCH operations, each once, none settling a reservation."""
    if not requests:
        raise ApplicationError("A batch needs at least one operation.", code="invalid_request")
    if len(requests) > MAX_BATCH:
        raise ApplicationError(f"A batch holds at most {MAX_BATCH} operations.", code="batch_too_large")
    seen: set[tuple[int, str]] = set()
    for i, r in enumerate(requests):
        if (r.user_id, r.operation_id) in seen:
            raise BatchRefused(f"Item {i} repeats operation {r.operation_id} for user {r.user_id}.",
                               code="duplicate_operation", status=400, index=i)
        seen.add((r.user_id, r.operation_id))
        if r.reservation_id:
            raise BatchRefused(f"Item {i}: settle reservations with /api/tokens/consume.", code="invalid_request",
                               status=400, index=i)


def _refuse_unknown_names(requests: list[ConsumeRequest]) -> None:
    """Every operation type and provider named is known and active."""
    op_types = set(OperationType.objects.filter(active=True).values_list("slug", flat=True))
    providers = set(Provider.objects.filter(active=True).values_list("slug", flat=True))
    for i, r in enumerate(requests):
        if r.operation_type not in op_types:
            raise BatchRefused(f"Item {i}: unknown operation type '{r.operation_type}'.",
                               code="unknown_operation_type", status=400, index=i)
        if r.provider and r.provider not in providers:
            raise BatchRefused(f"Item {i}: unknown provider '{r.provider}'.", code="unknown_provider", status=400,
                               index=i)


def _accounts_for(requests: list[ConsumeRequest]) -> dict[int, Account]:
    """Every user's account (opened on first use); a user who does not exist refuses the batch."""
    user_ids = {r.user_id for r in requests}
    accounts = {a.user_id: a for a in Account.objects.select_related("tier").filter(user_id__in=user_ids)}
    missing = user_ids - accounts.keys()
    if missing:
        known = set(get_user_model().objects.filter(pk__in=missing).values_list("pk", flat=True))
        for i, r in enumerate(requests):
            if r.user_id in missing and r.user_id not in known:
                raise BatchRefused(f"Item {i}: no user with id {r.user_id}.", code="unknown_user", status=404, index=i)
        for user_id in missing:  # first use: rare, so per-user creation is fine
            accounts[user_id] = account_for_user(user_id=user_id)
    return accounts


def _current_periods(accounts: dict[int, Account], now: datetime) -> dict[int, UsagePeriod]:
    """Each user's current period (opened if need be)."""
    periods = periods_current(accounts=list(accounts.values()), now=now)
    return {user_id: periods[account.pk] for user_id, account in accounts.items()}


def _replays_and_fresh(requests: list[ConsumeRequest], accounts: dict[int, Account], ctx: RequestContext
                       ) -> tuple[dict[int, BatchItemResult], list[tuple[int, ConsumeRequest]], list[AuditLog]]:
    """What was recorded already answers as before (with an audit row each); a changed
    body refuses the batch; the rest is fresh."""
    existing = {
        (e.account_id, e.operation_id): e
        for e in LedgerEntry.objects.filter(
            kind=LedgerEntry.Kind.CONSUMPTION, account_id__in=[a.pk for a in accounts.values()],
            operation_id__in={r.operation_id for r in requests}).only("pk", "account_id", "operation_id",
                                                                      "fingerprint", "response")
    }
    replayed: dict[int, BatchItemResult] = {}
    fresh: list[tuple[int, ConsumeRequest]] = []
    audits: list[AuditLog] = []
    for i, r in enumerate(requests):
        entry = existing.get((accounts[r.user_id].pk, r.operation_id))
        if entry is None:
            fresh.append((i, r))
        elif entry.fingerprint != r.fingerprint():
            raise BatchRefused(f"Item {i}: operation {r.operation_id} was already recorded with a different body.",
                               code="operation_id_conflict", status=409, index=i)
        else:
            replayed[i] = BatchItemResult(i, replay_body(response=entry.response, request=r, entry_id=entry.pk),
                                          replayed=True)
            audits.append(audit_row(ctx=ctx, user_id=r.user_id, action="consume", result="replayed", tokens=r.tokens,
                                    operation_type=r.operation_type, operation_id=r.operation_id,
                                    detail={"batch": True}))
    return replayed, fresh, audits


def _lock_within_caps(delta: dict[int, int], fresh: list[tuple[int, ConsumeRequest]],
                      periods: dict[int, UsagePeriod]) -> None:
    """Lock the batch's periods (in id order, so concurrent batches cannot deadlock) and
    refuse the batch, naming the item that crosses it, if any would pass its cap."""
    locked = list(UsagePeriod.objects.select_for_update().filter(pk__in=list(delta)).order_by("pk"))
    if all(p.used + p.reserved + delta[p.pk] <= p.cap for p in locked):
        return
    committed = {p.pk: p.used + p.reserved for p in locked}
    caps = {p.pk: p.cap for p in locked}
    for index, request in fresh:
        pk = periods[request.user_id].pk
        committed[pk] += request.tokens
        if committed[pk] > caps[pk]:
            raise BatchRefused(f"Item {index}: user {request.user_id} would pass their token cap.",
                               code="token_cap_exceeded", status=402, index=index)


def _record_fresh(fresh: list[tuple[int, ConsumeRequest]], accounts: dict[int, Account],
                  periods: dict[int, UsagePeriod], delta: dict[int, int], now: datetime, ctx: RequestContext,
                  replay_audits: list[AuditLog]) -> dict[int, BatchItemResult]:
    """The ledger rows (each storing its answer) and audit rows of the fresh items, once
    their periods are updated; then one usage_recorded_many for them all."""
    after = {p.pk: p for p in UsagePeriod.objects.filter(pk__in=list(delta))}
    tiers = {periods[user_id].pk: account.tier.slug if account.tier else None for user_id, account in accounts.items()}
    shared: dict[Any, str] = {}
    figures = {pk: PeriodFigures(tier=tiers[pk], limit=p.token_limit, reserved=p.reserved, cap=p.cap,
                                 overage_rate=p.overage_rate, period_start=p.starts_at, period_end=p.ends_at,
                                 shared=shared) for pk, p in after.items()}
    used_before = {pk: after[pk].used - d for pk, d in delta.items()}
    bodies = running_bodies(((r, periods[r.user_id].pk) for _, r in fresh), figures, used_before, api_time(now))
    entries = [
        LedgerEntry(account=accounts[r.user_id], period=after[periods[r.user_id].pk], kind=LedgerEntry.Kind.CONSUMPTION,
                    used_delta=r.tokens, operation_id=r.operation_id, operation_type=r.operation_type,
                    provider=r.provider, model=r.model, estimated_tokens=r.estimated_tokens, actual_tokens=r.tokens,
                    service_key_id=ctx.service_key_id, fingerprint=r.fingerprint(), response=body, created_at=now)
        for (_, r), body in zip(fresh, bodies)]
    audits = [audit_row(ctx=ctx, user_id=r.user_id, action="consume", result="recorded", tokens=r.tokens,
                        operation_type=r.operation_type, operation_id=r.operation_id, detail={"batch": True})
              for _, r in fresh]
    LedgerEntry.objects.bulk_create(entries)
    AuditLog.objects.bulk_create(audits + replay_audits)
    notify_usages([(after[pk], after[pk].used - d) for pk, d in delta.items()])
    return {i: BatchItemResult(i, {**body, "entryId": entry.pk}, replayed=False)
            for (i, _), body, entry in zip(fresh, bodies, entries)}
