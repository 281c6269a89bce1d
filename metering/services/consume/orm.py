"""The consume through the ORM, single and batch: the path that tells every case apart
(unknown names, first use, replays, conflicts, reservations, the cap, alert thresholds
crossed) and answers alike with the contract's body. The dispatcher (dispatch.py) sends
here whatever the PostgreSQL statements (postgres.py) leave; this never calls them.

Every change to a period's counters is one conditional UPDATE (or, for a batch, one
UPDATE of periods locked and checked first) plus the ledger rows that explain it, in
one transaction.
"""
from __future__ import annotations

import uuid
from collections import defaultdict
from datetime import datetime
from typing import Any

from django.contrib.auth import get_user_model
from django.db import IntegrityError, transaction
from django.db.models import Case, F, IntegerField, Value, When
from django.utils import timezone

from consensus_tokens.errors import ApplicationError

from ...errors import OperationIdConflict, ReservationExpired, ReservationNotFound, TokenCapExceeded
from ...models import Account, AuditLog, LedgerEntry, OperationType, Provider, Reservation, UsagePeriod
from ..accounts import account_for_user, period_current, periods_current
from ..audit import audit_record, audit_row, known_user_id
from ..context import RequestContext
from ..notify import notify_usage, notify_usages
from ..usage import (operation_type_get, provider_check, reservation_hold_release, reservation_of, reservations_expire,
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
    reservation, freed = None, 0
    if request.reservation_id:
        reservation, freed = _hold_to_settle(account, period, request, ctx, now)
    # the period's expired holds give their tokens back before the cap is applied, so a
    # consume refused only because of them succeeds
    reservations_expire(Reservation.objects.filter(period=period), now=now)
    _charge(period, request, freed)
    period.refresh_from_db(fields=["used", "reserved", "token_limit", "cap", "overage_rate"])
    tier_slug = account.tier.slug if account.tier else None
    body = consume_body(request=request, usage=usage_of(period, tier_slug).as_api(), recorded_at=api_time(now))
    entry = LedgerEntry(account=account, period=period, kind=LedgerEntry.Kind.CONSUMPTION,
                        used_delta=request.tokens, reserved_delta=-freed, operation_id=request.operation_id,
                        operation_type=request.operation_type, provider=request.provider, model=request.model,
                        estimated_tokens=request.estimated_tokens, actual_tokens=request.tokens,
                        script_class=request.script_class,
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
    """The hold this consume settles (locked), and the tokens settling it frees in `period`."""
    reservation = reservation_of(account, request.reservation_id, lock=True)
    status = _settleable(reservation, now)
    if status != Reservation.Status.HELD:
        raise ReservationExpired(f"Reservation {request.reservation_id} is {status}; consume without reservationId.",
                                 extra={"status": status})
    if reservation.period_id == period.pk:
        return reservation, reservation.tokens
    # held in a period that has ended: free it there, charge this one (within its cap: a
    # refusal rolls this release back with the rest, and the hold stays held)
    reservation_hold_release(reservation, ctx=ctx, status=Reservation.Status.SETTLED)
    return reservation, 0


def _settleable(reservation: Reservation, now: datetime) -> str:
    """The hold's status for settling: past its expiry a hold is expired whether or not it
    was released yet, so the answer does not depend on when that is written."""
    return Reservation.Status.EXPIRED if reservation.expires_at <= now else reservation.status


def _charge(period: UsagePeriod, request: ConsumeRequest, freed: int) -> None:
    """Add the tokens to the period within its cap, giving back the `freed` hold a settlement
    settles: settling may use more than its hold only within the room left under the cap.
    Past it the consume is refused like any other (nothing recorded, the hold kept)."""
    changed = UsagePeriod.objects.filter(within_cap(request.tokens, freed=freed), pk=period.pk).update(
        used=F("used") + request.tokens, reserved=F("reserved") - freed)
    if not changed:
        now = UsagePeriod.objects.filter(pk=period.pk).values("used", "reserved", "cap").get()
        room = now["cap"] - now["used"] - now["reserved"] + freed
        raise TokenCapExceeded("This operation would pass the user's token cap.",
                               extra={"available": max(0, room), "cap": now["cap"]})


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
    except BatchRefused as error:
        # A copy of this batch committed first may have settled the hold or filled the cap
        # the refusal is about: then the item named is recorded, and a second pass replays.
        if error.code not in (ReservationExpired.code, TokenCapExceeded.code) or not _recorded(
                requests[error.extra["index"]]):
            raise
        return _consume_batch(requests, ctx)


def _recorded(request: ConsumeRequest) -> bool:
    return LedgerEntry.objects.filter(kind=LedgerEntry.Kind.CONSUMPTION, account__user_id=request.user_id,
                                      operation_id=request.operation_id).exists()


def _consume_batch(requests: list[ConsumeRequest], ctx: RequestContext) -> list[BatchItemResult]:
    _refuse_malformed(requests)
    _refuse_unknown_names(requests)
    accounts = _accounts_for(requests)
    now = timezone.now()
    periods = _current_periods(accounts, now)
    replayed, fresh, replay_audits = _replays_and_fresh(requests, accounts, ctx)
    with transaction.atomic():
        # locks: the holds settled (in id order), then the periods (in id order), as every path takes them
        holds = _holds_to_settle(fresh, accounts, now)
        freed = {i: h.tokens for i, h in holds.items() if h.period_id == periods[requests[i].user_id].pk}
        delta: dict[int, int] = defaultdict(int)
        freed_in: dict[int, int] = defaultdict(int)
        for i, r in fresh:
            delta[periods[r.user_id].pk] += r.tokens
            freed_in[periods[r.user_id].pk] += freed.get(i, 0)
        if delta:
            _lock_within_caps(delta, freed_in, fresh, freed, periods, holds, now, ctx)
            _add_to_periods(delta, freed_in)
        if holds:
            Reservation.objects.filter(pk__in=[h.pk for h in holds.values()], status=Reservation.Status.HELD).update(
                status=Reservation.Status.SETTLED, finished_at=now)
        recorded = _record_fresh(fresh, accounts, periods, delta, holds, freed, now, ctx, replay_audits)
    results = {**replayed, **recorded}
    return [results[i] for i in range(len(requests))]


def _add_to_periods(delta: dict[int, int], freed_in: dict[int, int]) -> None:
    """One UPDATE for all the batch's periods (locked and checked): the tokens used, less the holds settled."""
    def per_period(amounts: dict[int, int]) -> Case:
        return Case(*[When(pk=pk, then=Value(d)) for pk, d in amounts.items()], output_field=IntegerField())

    changes: dict[str, Any] = {"used": F("used") + per_period(delta)}
    if any(freed_in.values()):
        changes["reserved"] = F("reserved") - per_period(freed_in)
    UsagePeriod.objects.filter(pk__in=list(delta)).update(**changes)


def _refuse_malformed(requests: list[ConsumeRequest]) -> None:
    """A batch holds 1 to MAX_BATCH operations, each once, settling each reservation at most once."""
    if not requests:
        raise ApplicationError("A batch needs at least one operation.", code="invalid_request")
    if len(requests) > MAX_BATCH:
        raise ApplicationError(f"A batch holds at most {MAX_BATCH} operations.", code="batch_too_large")
    seen: set[tuple[int, str]] = set()
    holds: set[uuid.UUID] = set()
    for i, r in enumerate(requests):
        if (r.user_id, r.operation_id) in seen:
            raise BatchRefused(f"Item {i} repeats operation {r.operation_id} for user {r.user_id}.",
                               code="duplicate_operation", status=400, index=i)
        seen.add((r.user_id, r.operation_id))
        if r.reservation_id:
            hold = _reservation_key(r, i)
            if hold in holds:
                raise BatchRefused(f"Item {i} settles reservation {r.reservation_id} again.",
                                   code="duplicate_reservation", status=400, index=i)
            holds.add(hold)


def _reservation_key(request: ConsumeRequest, index: int) -> uuid.UUID:
    try:
        return uuid.UUID(request.reservation_id)
    except ValueError:
        raise BatchRefused(f"Item {index}: reservationId is not a UUID.", code="invalid_request", status=400,
                           index=index) from None


def _holds_to_settle(fresh: list[tuple[int, ConsumeRequest]], accounts: dict[int, Account],
                     now: datetime) -> dict[int, Reservation]:
    """The holds the fresh items settle (item index -> hold), locked in id order; an item
    whose hold is not its user's, or no longer held, refuses the batch."""
    wanted = {i: _reservation_key(r, i) for i, r in fresh if r.reservation_id}
    if not wanted:
        return {}
    found = {h.pk: h for h in Reservation.objects.select_for_update().filter(pk__in=list(wanted.values()))
             .order_by("pk")}
    holds = {}
    for i, r in fresh:
        if i not in wanted:
            continue
        hold = found.get(wanted[i])
        if hold is None or hold.account_id != accounts[r.user_id].pk:
            raise BatchRefused(f"Item {i}: no reservation {r.reservation_id} for user {r.user_id}.",
                               code=ReservationNotFound.code, status=ReservationNotFound.status, index=i)
        status = _settleable(hold, now)
        if status != Reservation.Status.HELD:
            raise BatchRefused(f"Item {i}: reservation {r.reservation_id} is {status}; consume without reservationId.",
                               code=ReservationExpired.code, status=ReservationExpired.status, index=i,
                               extra={"status": status})
        holds[i] = hold
    return holds


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


def _lock_within_caps(delta: dict[int, int], freed_in: dict[int, int], fresh: list[tuple[int, ConsumeRequest]],
                      freed: dict[int, int], periods: dict[int, UsagePeriod], holds: dict[int, Reservation],
                      now: datetime, ctx: RequestContext) -> None:
    """Lock the batch's periods (in id order, so concurrent batches cannot deadlock; with
    those of holds placed in a period since ended), give back their expired holds and the
    ended periods' holds settled here, and refuse the batch, naming the item that crosses
    it, if any period would pass its cap (counting the holds its items settle)."""
    ended = {h.period_id for h in holds.values()} - delta.keys()
    locked = {p.pk: p for p in UsagePeriod.objects.select_for_update().filter(pk__in=[*delta, *ended]).order_by("pk")}
    changed = reservations_expire(Reservation.objects.filter(period_id__in=list(delta)), now=now)
    for hold in holds.values():
        if hold.period_id in ended:  # held in a period that has ended: free it there, charge this one
            reservation_hold_release(hold, ctx=ctx, status=Reservation.Status.SETTLED)
    if changed:
        locked = {p.pk: p for p in UsagePeriod.objects.filter(pk__in=list(delta))}
    over = {pk for pk, d in delta.items()
            if locked[pk].used + locked[pk].reserved + d - freed_in[pk] > locked[pk].cap}
    if not over:
        return
    committed = {pk: locked[pk].used + locked[pk].reserved for pk in over}
    for index, request in fresh:
        pk = periods[request.user_id].pk
        if pk not in over:
            continue
        room = locked[pk].cap - committed[pk] + freed.get(index, 0)
        committed[pk] += request.tokens - freed.get(index, 0)
        if committed[pk] > locked[pk].cap:
            raise BatchRefused(f"Item {index}: user {request.user_id} would pass their token cap.",
                               code=TokenCapExceeded.code, status=TokenCapExceeded.status, index=index,
                               extra={"available": max(0, room), "cap": locked[pk].cap})


def _record_fresh(fresh: list[tuple[int, ConsumeRequest]], accounts: dict[int, Account],
                  periods: dict[int, UsagePeriod], delta: dict[int, int], holds: dict[int, Reservation],
                  freed: dict[int, int], now: datetime, ctx: RequestContext,
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
                    used_delta=r.tokens, reserved_delta=-freed.get(i, 0), operation_id=r.operation_id,
                    operation_type=r.operation_type, provider=r.provider, model=r.model,
                    estimated_tokens=r.estimated_tokens, actual_tokens=r.tokens, script_class=r.script_class,
                    reservation=holds.get(i),
                    service_key_id=ctx.service_key_id, fingerprint=r.fingerprint(), response=body, created_at=now)
        for (i, r), body in zip(fresh, bodies)]
    audits = [audit_row(ctx=ctx, user_id=r.user_id, action="consume", result="recorded", tokens=r.tokens,
                        operation_type=r.operation_type, operation_id=r.operation_id, detail={"batch": True})
              for _, r in fresh]
    LedgerEntry.objects.bulk_create(entries)
    AuditLog.objects.bulk_create(audits + replay_audits)
    notify_usages([(after[pk], after[pk].used - d) for pk, d in delta.items()])
    return {i: BatchItemResult(i, {**body, "entryId": entry.pk}, replayed=False)
            for (i, _), body, entry in zip(fresh, bodies, entries)}
