"""Consuming up to 1,000 operations at once: all or nothing, in a constant
number of queries whatever the batch size."""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from django.contrib.auth import get_user_model
from django.conf import settings
from django.db import IntegrityError, connection, transaction
from django.db.models import Case, F, IntegerField, Value, When
from django.utils import timezone

from consensus_tokens.errors import ApplicationError

from ..models import Account, AuditLog, LedgerEntry, OperationType, Provider, UsagePeriod
from .accounts import account_for_user, period_current
from .audit import audit_row
from .context import RequestContext
from .usage import ConsumeRequest, _notify_usages, consume_response, stored_body, usage_of

MAX_BATCH = 1000


class BatchRefused(ApplicationError):
    """Carries the offending item's index so the caller knows what to fix."""

    def __init__(self, message: str, *, code: str, status: int, index: int) -> None:
        super().__init__(message, code=code, status=status, extra={"index": index})


@dataclass(frozen=True)
class BatchItemResult:
    index: int
    body: dict[str, Any]
    replayed: bool


def usage_consume_batch(*, requests: list[ConsumeRequest], ctx: RequestContext) -> list[BatchItemResult]:
    if settings.METERING_FAST_PATH and connection.vendor == "postgresql":
        from .fast_batch import consume_batch_fast

        try:  # all fresh and within caps: a few set-based statements; anything else is answered below
            fast = consume_batch_fast(requests=requests, ctx=ctx)
        except IntegrityError:
            fast = None  # an operation id recorded concurrently: nothing kept, the ORM path replays it
        if fast is not None:
            return fast
    try:
        return _consume_batch(requests, ctx)
    except IntegrityError:
        # an operation id in the batch was recorded concurrently; nothing was kept,
        # and a second pass sees it as a replay.
        return _consume_batch(requests, ctx)


def _consume_batch(requests: list[ConsumeRequest], ctx: RequestContext) -> list[BatchItemResult]:
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

    op_types = set(OperationType.objects.filter(active=True).values_list("slug", flat=True))
    providers = set(Provider.objects.filter(active=True).values_list("slug", flat=True))
    for i, r in enumerate(requests):
        if r.operation_type not in op_types:
            raise BatchRefused(f"Item {i}: unknown operation type '{r.operation_type}'.",
                               code="unknown_operation_type", status=400, index=i)
        if r.provider and r.provider not in providers:
            raise BatchRefused(f"Item {i}: unknown provider '{r.provider}'.", code="unknown_provider", status=400,
                               index=i)

    accounts = _accounts_for(requests)
    now = timezone.now()
    periods = _current_periods(accounts, now)

    # What was recorded already: a replay answers as before, a changed body refuses the batch.
    existing = {
        (e.account_id, e.operation_id): e
        for e in LedgerEntry.objects.filter(
            kind=LedgerEntry.Kind.CONSUMPTION, account_id__in=[a.pk for a in accounts.values()],
            operation_id__in={r.operation_id for r in requests}).only("pk", "account_id", "operation_id",
                                                                      "fingerprint", "response")
    }
    results: dict[int, BatchItemResult] = {}
    fresh: list[tuple[int, ConsumeRequest]] = []
    replay_audits: list[AuditLog] = []
    for i, r in enumerate(requests):
        entry = existing.get((accounts[r.user_id].pk, r.operation_id))
        if entry is None:
            fresh.append((i, r))
        elif entry.fingerprint != r.fingerprint():
            raise BatchRefused(f"Item {i}: operation {r.operation_id} was already recorded with a different body.",
                               code="operation_id_conflict", status=409, index=i)
        else:
            results[i] = BatchItemResult(i, {**stored_body(entry.response, r), "entryId": entry.pk}, replayed=True)
            replay_audits.append(audit_row(ctx=ctx, user_id=r.user_id, action="consume", result="replayed",
                                           tokens=r.tokens, operation_type=r.operation_type,
                                           operation_id=r.operation_id, detail={"batch": True}))

    delta: dict[int, int] = defaultdict(int)
    for _, r in fresh:
        delta[periods[r.user_id].pk] += r.tokens

    with transaction.atomic():
        if delta:
            _apply_deltas(delta, fresh, periods)
        after = {p.pk: p for p in UsagePeriod.objects.filter(pk__in=list(delta))}
        running = {pk: after[pk].used - d for pk, d in delta.items()}
        entries, audits, bodies = [], [], []
        for i, r in fresh:
            period = after[periods[r.user_id].pk]
            running[period.pk] += r.tokens
            snapshot = UsagePeriod(token_limit=period.token_limit, cap=period.cap, used=running[period.pk],
                                   reserved=period.reserved, overage_rate=period.overage_rate,
                                   starts_at=period.starts_at, ends_at=period.ends_at)
            account = accounts[r.user_id]
            body = consume_response(request=r, usage=usage_of(snapshot, account.tier.slug if account.tier else None),
                                    recorded_at=now)
            bodies.append((i, body))
            entries.append(LedgerEntry(
                account=account, period=period, kind=LedgerEntry.Kind.CONSUMPTION, used_delta=r.tokens,
                operation_id=r.operation_id, operation_type=r.operation_type, provider=r.provider, model=r.model,
                estimated_tokens=r.estimated_tokens, actual_tokens=r.tokens, service_key_id=ctx.service_key_id,
                fingerprint=r.fingerprint(), response=body, created_at=now))
            audits.append(audit_row(ctx=ctx, user_id=r.user_id, action="consume", result="recorded", tokens=r.tokens,
                                    operation_type=r.operation_type, operation_id=r.operation_id,
                                    detail={"batch": True}))
        LedgerEntry.objects.bulk_create(entries)
        AuditLog.objects.bulk_create(audits + replay_audits)
        for (i, body), entry in zip(bodies, entries):
            results[i] = BatchItemResult(i, {**body, "entryId": entry.pk}, replayed=False)
        _notify_usages([(after[pk], after[pk].used - d) for pk, d in delta.items()])
    return [results[i] for i in range(len(requests))]


def _accounts_for(requests: list[ConsumeRequest]) -> dict[int, Account]:
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


def _current_periods(accounts: dict[int, Account], now) -> dict[int, UsagePeriod]:
    by_account: dict[int, UsagePeriod] = {}
    for p in UsagePeriod.objects.filter(account_id__in=[a.pk for a in accounts.values()], starts_at__lte=now,
                                        ends_at__gt=now).order_by("starts_at"):
        by_account[p.account_id] = p
    periods = {}
    for user_id, account in accounts.items():
        period = by_account.get(account.pk) or period_current(account=account, now=now)
        periods[user_id] = period
    return periods


def _apply_deltas(delta: dict[int, int], fresh: list[tuple[int, ConsumeRequest]],
                  periods: dict[int, UsagePeriod]) -> None:
    """Lock the batch's periods (in id order, so concurrent batches cannot
    deadlock), refuse the batch if any would pass its cap, then one UPDATE."""
    locked = list(UsagePeriod.objects.select_for_update().filter(pk__in=list(delta)).order_by("pk"))
    if any(p.used + p.reserved + delta[p.pk] > p.cap for p in locked):
        # name the item that crosses the cap, not merely its user's first
        committed = {p.pk: p.used + p.reserved for p in locked}
        caps = {p.pk: p.cap for p in locked}
        for index, request in fresh:
            pk = periods[request.user_id].pk
            committed[pk] += request.tokens
            if committed[pk] > caps[pk]:
                raise BatchRefused(f"Item {index}: user {request.user_id} would pass their token cap.",
                                   code="token_cap_exceeded", status=402, index=index)
    amount = Case(*[When(pk=pk, then=Value(d)) for pk, d in delta.items()], output_field=IntegerField())
    UsagePeriod.objects.filter(pk__in=list(delta)).update(used=F("used") + amount)


__all__ = ["MAX_BATCH", "BatchRefused", "usage_consume_batch"]
