"""Alerts' business rules: recording alerts, delivering them exactly once,
e-mail preferences, and the work of alerts' periodic jobs (weekly digest,
resending, anomaly detection). Tasks and receivers call these."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from decimal import Decimal
from functools import partial
from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.mail import mail_admins
from django.db import IntegrityError, transaction
from django.db.models import Count, Exists, F, OuterRef, Q, Sum
from django.db.models.functions import Coalesce
from django.template.loader import render_to_string
from django.utils import timezone

from consensus_tokens.errors import ApplicationError
from metering.models import Account, AuditLog, LedgerEntry, UsagePeriod
from metering.services import RequestContext, account_apply_terms, audit_record

from .emails import PREFERENCE_FOR_KIND, email_for_event
from .models import AlertEvent, AnomalyFlag, EmailPreference
from .selectors import PREFERENCE_KINDS, Preferences, alert_preferences_get, digest_sunday
from .unsubscribe import unsubscribe_token_read

logger = logging.getLogger(__name__)

__all__ = [
    "alert_crossings", "alert_crossings_record", "alert_deliver", "alert_preferences_get", "alert_preferences_update",
    "alert_unsubscribe", "alerts_requeue", "alerts_send_pending", "anomalies_detect", "anomaly_flag_notify", "anomaly_flag_resolve",
    "period_summary_record", "weekly_digests_record",
]


# --- preferences ---------------------------------------------------------------------------------

def alert_preferences_update(*, user, **changes: bool) -> Preferences:
    """Turn kinds of usage e-mail on or off: usage_alerts, weekly_digest, period_summary."""
    unknown = set(changes) - set(PREFERENCE_KINDS)
    if unknown:
        raise ApplicationError(f"Unknown e-mail kind(s): {', '.join(sorted(unknown))}.", code="invalid_request",
                               extra={"fields": {k: ["Unknown e-mail kind."] for k in sorted(unknown)}})
    if not all(isinstance(v, bool) for v in changes.values()):
        raise ApplicationError("Preferences are true or false.", code="invalid_request")
    with transaction.atomic():
        row, _ = EmailPreference.objects.select_for_update().get_or_create(user=user)
        for kind, value in changes.items():
            setattr(row, kind, value)
        row.full_clean()
        row.save()
    return alert_preferences_get(user=user)


def alert_unsubscribe(*, token: str) -> tuple[Any, str]:
    """Follow an unsubscribe link: that kind of usage e-mail is off. Returns (user, kind)."""
    user_id, preference = unsubscribe_token_read(token=token)
    user = get_user_model().objects.filter(pk=user_id).first()
    if user is None:
        raise ApplicationError("This unsubscribe link is not valid.", code="invalid_token")
    alert_preferences_update(user=user, **{preference: False})
    audit_record(ctx=RequestContext(actor="unsubscribe-link"), user_id=user.pk, action="unsubscribe",
                 result="recorded", detail={"kind": preference})
    return user, preference


# --- recording -----------------------------------------------------------------------------------

def alert_crossings(*, limit: int, used_before: int, used: int,
                    thresholds: list[int] | None = None) -> tuple[list[int], bool]:
    """Pure arithmetic for the hot path: which thresholds (% of limit) this change
    crossed, and whether it entered overage."""
    if limit <= 0 or used <= used_before:
        return [], False
    thresholds = settings.ALERT_THRESHOLDS if thresholds is None else thresholds
    crossed = [t for t in thresholds if used_before * 100 < t * limit <= used * 100]
    return crossed, used_before <= limit < used


def _enqueue(event_id: int) -> None:
    from .tasks import alert_send_task

    try:
        alert_send_task.delay(event_id)
    except Exception:  # broker down: the row is pending, the resend job delivers it
        logger.warning("could not enqueue alert %s; the resend job will send it", event_id, exc_info=True)


def _event_record(*, account_id: int, period_id: int, kind: str, recipient: str, context: dict[str, Any],
                  threshold: int = 0, week: date | None = None, superseded_by: str = "") -> AlertEvent | None:
    """Insert one alert unless it exists (its unique constraint decides, inside a
    savepoint so a duplicate never breaks the caller's transaction), and send it
    once the caller's transaction commits. None when it was already there.
    A superseded alert is recorded (so it is never sent later) but not sent."""
    event = AlertEvent(account_id=account_id, period_id=period_id, kind=kind, threshold=threshold, week=week,
                       recipient=recipient, context=context, created_at=timezone.now())
    if superseded_by:
        event.status, event.last_error = AlertEvent.Status.SKIPPED, f"superseded by the {superseded_by} alert"
    try:
        with transaction.atomic():
            event.save()
    except IntegrityError:
        return None
    if not superseded_by:
        transaction.on_commit(partial(_enqueue, event.pk), robust=True)
    return event


def _recipient_of(account_id: int) -> str:
    return get_user_model().objects.filter(token_account__id=account_id).values_list("email", flat=True).first() or ""


def alert_crossings_record(*, period: UsagePeriod, used_before: int) -> list[AlertEvent]:
    """Called inside the transaction that raised `period.used`: record each
    threshold crossed (and the entry into overage), to be e-mailed after commit.
    No query at all unless something was crossed."""
    crossed, overage = alert_crossings(limit=period.token_limit, used_before=used_before, used=period.used)
    if not crossed and not overage:
        return []
    recipient = _recipient_of(period.account_id)
    snapshot = {"used": period.used, "usedBefore": used_before, "limit": period.token_limit, "cap": period.cap,
                "overageRate": str(period.overage_rate)}
    # One change that crosses several: the user gets the one that says most (the
    # overage notice, else the highest threshold); the others are recorded as done.
    top = "overage" if overage else f"{crossed[-1]}%"
    events = []
    for threshold in crossed:
        superseded = "" if top == f"{threshold}%" else top
        event = _event_record(account_id=period.account_id, period_id=period.pk, kind=AlertEvent.Kind.THRESHOLD,
                              threshold=threshold, recipient=recipient, context=snapshot, superseded_by=superseded)
        if event is not None:
            events.append(event)
    if overage:
        tokens = period.used - period.token_limit
        context = {**snapshot, "overageTokens": tokens,
                   "overageCharge": str(Decimal(tokens) * Decimal(period.overage_rate))}
        event = _event_record(account_id=period.account_id, period_id=period.pk, kind=AlertEvent.Kind.OVERAGE,
                              recipient=recipient, context=context)
        if event is not None:
            events.append(event)
    return events


def _period_snapshot(period: UsagePeriod) -> dict[str, Any]:
    return {"used": period.used, "limit": period.token_limit, "cap": period.cap,
            "overageRate": str(period.overage_rate), "periodStart": period.starts_at.isoformat(),
            "periodEnd": period.ends_at.isoformat()}


def period_summary_record(*, period: UsagePeriod) -> AlertEvent | None:
    """Called inside the transaction that closed `period` (metering's period_closed):
    record its summary e-mail, sent after commit. Once per period (its unique
    constraint); none for a period that ended more than ALERTS_SUMMARY_LOOKBACK_DAYS
    before it was closed (a job far behind) or for an account without a tier."""
    closed_at = period.closed_at or timezone.now()
    if period.ends_at <= closed_at - timedelta(days=settings.ALERTS_SUMMARY_LOOKBACK_DAYS):
        return None
    recipient = (Account.objects.filter(pk=period.account_id, tier__isnull=False)
                 .values_list("user__email", flat=True).first())
    if recipient is None:
        return None
    return _event_record(account_id=period.account_id, period_id=period.pk, kind=AlertEvent.Kind.PERIOD_SUMMARY,
                         recipient=recipient, context=_period_snapshot(period))


def weekly_digests_record(*, now: datetime | None = None) -> list[AlertEvent]:
    """This week's digest for every user at or above the lowest alert threshold."""
    now = now or timezone.now()
    minimum = min(settings.ALERT_THRESHOLDS, default=75)
    sunday = digest_sunday(now)
    periods = (UsagePeriod.objects.filter(starts_at__lte=now, ends_at__gt=now, token_limit__gt=0)
               .alias(used_pct=F("used") * 100).filter(used_pct__gte=F("token_limit") * minimum)
               .exclude(Exists(AlertEvent.objects.filter(account_id=OuterRef("account_id"), week=sunday,
                                                         kind=AlertEvent.Kind.WEEKLY_DIGEST)))
               .select_related("account__user"))
    events = []
    with transaction.atomic():
        for period in periods:
            event = _event_record(account_id=period.account_id, period_id=period.pk,
                                  kind=AlertEvent.Kind.WEEKLY_DIGEST, week=sunday,
                                  recipient=period.account.user.email, context=_period_snapshot(period))
            if event is not None:
                events.append(event)
    return events


# --- delivery ------------------------------------------------------------------------------------

def _skip_reason(event: AlertEvent) -> str:
    if not event.recipient:
        return "the user has no e-mail address"
    preference = PREFERENCE_FOR_KIND.get(event.kind)
    if preference and not getattr(alert_preferences_get(user=event.account.user), preference):
        return f"the user turned off {preference.replace('_', ' ')}"
    return ""


def alert_deliver(*, event_id: int) -> str:
    """Send one recorded alert, at most once however many workers, retries and
    resend runs try: the row is claimed (status `sending`) in a short transaction,
    the e-mail goes out after it, and only a claim older than
    ALERTS_CLAIM_STALE_SECONDS (a worker that died mid-send) is taken over.
    Returns the resulting status, or "busy" when someone else holds it."""
    now = timezone.now()
    stale = now - timedelta(seconds=settings.ALERTS_CLAIM_STALE_SECONDS)
    with transaction.atomic():
        # of=self: lock only the alert, not the joined account/user rows, which every
        # concurrent consume holds a key-share lock on.
        event = (AlertEvent.objects.select_for_update(skip_locked=True, of=("self",))
                 .select_related("account__user").filter(pk=event_id).first())
        if event is None:
            return "busy"
        if event.status in (AlertEvent.Status.SENT, AlertEvent.Status.SKIPPED, AlertEvent.Status.FAILED):
            return event.status
        if event.status == AlertEvent.Status.SENDING and event.claimed_at and event.claimed_at > stale:
            return "busy"
        reason = _skip_reason(event)
        if reason:
            event.status, event.last_error = AlertEvent.Status.SKIPPED, reason
            event.save(update_fields=["status", "last_error"])
            return event.status
        event.status, event.claimed_at, event.attempts = AlertEvent.Status.SENDING, now, event.attempts + 1
        event.save(update_fields=["status", "claimed_at", "attempts"])
    claimed = AlertEvent.objects.filter(pk=event.pk, status=AlertEvent.Status.SENDING, claimed_at=now)
    try:
        email_for_event(event).send()
    except Exception as exc:
        gave_up = event.attempts >= settings.ALERTS_MAX_ATTEMPTS
        claimed.update(status=AlertEvent.Status.FAILED if gave_up else AlertEvent.Status.PENDING,
                       last_error=f"{type(exc).__name__}: {exc}"[:1000], claimed_at=None)
        raise
    claimed.update(status=AlertEvent.Status.SENT, sent_at=timezone.now(), last_error="")
    return AlertEvent.Status.SENT


def alerts_requeue(*, event_ids: list[int]) -> int:
    """Support's "send again": failed alerts get a fresh set of attempts; pending
    and failed ones are queued after commit (the resend job covers a broker outage)."""
    with transaction.atomic():
        ids = list(AlertEvent.objects.select_for_update(of=("self",)).filter(
            pk__in=event_ids, status__in=[AlertEvent.Status.PENDING, AlertEvent.Status.FAILED])
            .values_list("pk", flat=True))
        AlertEvent.objects.filter(pk__in=ids, status=AlertEvent.Status.FAILED).update(
            status=AlertEvent.Status.PENDING, attempts=0, claimed_at=None)
        for event_id in ids:
            transaction.on_commit(partial(_enqueue, event_id), robust=True)
    return len(ids)


def alert_resend_by_support(*, user_id: int, event_id: int, reason: str, ctx: RequestContext) -> None:
    """Support's "send again" for one alert, audited with who and why in the same transaction;
    an alert already sent is refused."""
    with transaction.atomic():
        if not alerts_requeue(event_ids=[event_id]):
            raise ApplicationError("That alert is no longer pending or failed.", code="invalid_request")
        audit_record(ctx=ctx, user_id=user_id, action="alert_resend", result="queued",
                     detail={"reason": reason, "alertId": event_id})


@dataclass(frozen=True)
class ResendResult:
    sent: int
    failed: int
    staff_notified: int


def alerts_send_pending(*, now: datetime | None = None, limit: int = 500) -> ResendResult:
    """The periodic catch-up: alerts recorded but not sent (broker outage, a worker
    that died, an SMTP failure) and staff notices for anomaly flags."""
    now = now or timezone.now()
    grace = now - timedelta(seconds=settings.ALERTS_RESEND_GRACE_SECONDS)
    stale = now - timedelta(seconds=settings.ALERTS_CLAIM_STALE_SECONDS)
    due = list(AlertEvent.objects.filter(Q(status=AlertEvent.Status.PENDING, created_at__lte=grace)
                                         | Q(status=AlertEvent.Status.SENDING, claimed_at__lte=stale))
               .order_by("created_at").values_list("pk", flat=True)[:limit])
    sent = failed = 0
    for event_id in due:
        try:
            sent += alert_deliver(event_id=event_id) == AlertEvent.Status.SENT
        except Exception:
            failed += 1
            logger.warning("alert %s not delivered; will retry", event_id, exc_info=True)
    notified = 0
    for flag_id in AnomalyFlag.objects.filter(notified_at__isnull=True, created_at__lte=grace).values_list(
            "pk", flat=True)[:limit]:
        try:
            notified += anomaly_flag_notify(flag_id=flag_id)
        except Exception:
            logger.warning("anomaly flag %s: staff not notified; will retry", flag_id, exc_info=True)
    return ResendResult(sent, failed, notified)


# --- anomalies -----------------------------------------------------------------------------------

REFUSED_RESULTS = ("token_cap_exceeded", "insufficient")


@dataclass(frozen=True)
class Window:
    start: datetime  # the hour examined
    end: datetime
    baseline_start: datetime  # the 24 hours before it

    @classmethod
    def last_full_hour(cls, now: datetime) -> "Window":
        end = now.replace(minute=0, second=0, microsecond=0)
        start = end - timedelta(hours=1)
        return cls(start, end, start - timedelta(hours=24))


def _spikes(window: Window, multiplier: int, minimum: int) -> list[dict[str, Any]]:
    """Consumption this hour > multiplier x the average hour of the previous 24."""
    rows = (LedgerEntry.objects.filter(kind=LedgerEntry.Kind.CONSUMPTION, created_at__gte=window.baseline_start,
                                       created_at__lt=window.end)
            .values("account_id")
            .annotate(observed=Coalesce(Sum("used_delta", filter=Q(created_at__gte=window.start)), 0),
                      before=Coalesce(Sum("used_delta", filter=Q(created_at__lt=window.start)), 0))
            .filter(observed__gte=minimum))
    return [r for r in rows if r["observed"] * 24 > multiplier * r["before"]]


def _refusal_bursts(window: Window, multiplier: int, minimum: int) -> list[dict[str, Any]]:
    """Refused consumes/reservations this hour: many, and > multiplier x the usual hour."""
    rows = (AuditLog.objects.filter(action__in=("consume", "reserve"), result__in=REFUSED_RESULTS,
                                    user__isnull=False, created_at__gte=window.baseline_start,
                                    created_at__lt=window.end)
            .values("user_id")
            .annotate(observed=Count("id", filter=Q(created_at__gte=window.start)),
                      before=Count("id", filter=Q(created_at__lt=window.start)),
                      keys=Count("service_key", distinct=True, filter=Q(created_at__gte=window.start)))
            .filter(observed__gte=minimum))
    found = [r for r in rows if r["observed"] * 24 > multiplier * r["before"]]
    accounts = dict(Account.objects.filter(user_id__in=[r["user_id"] for r in found]).values_list("user_id", "pk"))
    return [{**r, "account_id": accounts[r["user_id"]]} for r in found if r["user_id"] in accounts]


def _flag_record(*, account_id: int, rule: str, window: Window, row: dict[str, Any], multiplier: int,
                 minimum: int) -> AnomalyFlag | None:
    baseline = (Decimal(row["before"]) / 24).quantize(Decimal("0.0001"))
    details = {"observed": row["observed"], "previous24h": row["before"], "hourlyAverage": str(baseline),
               "ratio": str((Decimal(row["observed"]) / baseline).quantize(Decimal("0.01"))) if baseline else None,
               **({"serviceKeys": row["keys"]} if "keys" in row else {})}
    flag = AnomalyFlag(account_id=account_id, rule=rule, window_start=window.start, window_end=window.end,
                       observed=row["observed"], baseline=baseline, multiplier=multiplier, minimum=minimum,
                       details=details, created_at=timezone.now())
    with transaction.atomic():
        try:
            with transaction.atomic():
                flag.save()
        except IntegrityError:
            return None  # this window was flagged by an earlier run
        if settings.ANOMALY_HOLD:
            account = Account.objects.select_for_update(of=("self",)).select_related("tier").get(pk=account_id)
            if not account.anomaly_hold:
                account.anomaly_hold = True
                account.save(update_fields=["anomaly_hold"])
                account_apply_terms(account=account)
            flag.held = True
            flag.save(update_fields=["held"])
        audit_record(ctx=RequestContext(actor="anomaly-detection"),
                     user_id=Account.objects.values_list("user_id", flat=True).get(pk=account_id),
                     action="anomaly_flag", result="held" if flag.held else "flagged",
                     tokens=row["observed"] if rule == AnomalyFlag.Rule.SPIKE else None,
                     detail={"flagId": flag.pk, "rule": rule, **details})
        transaction.on_commit(partial(_enqueue_flag_notice, flag.pk), robust=True)
    return flag


def _enqueue_flag_notice(flag_id: int) -> None:
    from .tasks import anomaly_flag_notify_task

    try:
        anomaly_flag_notify_task.delay(flag_id)
    except Exception:
        logger.warning("could not enqueue the notice for flag %s; the resend job will send it", flag_id,
                       exc_info=True)


def anomalies_detect(*, now: datetime | None = None) -> list[AnomalyFlag]:
    """Run both rules over the last full hour. One flag per account, rule and hour,
    so running twice or late changes nothing."""
    window = Window.last_full_hour(now or timezone.now())
    multiplier = settings.ANOMALY_MULTIPLIER
    flags = []
    for row in _spikes(window, multiplier, settings.ANOMALY_MIN_TOKENS):
        flags.append(_flag_record(account_id=row["account_id"], rule=AnomalyFlag.Rule.SPIKE, window=window, row=row,
                                  multiplier=multiplier, minimum=settings.ANOMALY_MIN_TOKENS))
    for row in _refusal_bursts(window, multiplier, settings.ANOMALY_REFUSED_MIN):
        flags.append(_flag_record(account_id=row["account_id"], rule=AnomalyFlag.Rule.REFUSED_BURST, window=window,
                                  row=row, multiplier=multiplier, minimum=settings.ANOMALY_REFUSED_MIN))
    return [f for f in flags if f is not None]


def anomaly_flag_notify(*, flag_id: int) -> bool:
    """Tell staff about a flag, once: the flag is marked notified before the
    e-mail, and unmarked if sending fails so the next try sends it."""
    now = timezone.now()
    if not AnomalyFlag.objects.filter(pk=flag_id, notified_at__isnull=True).update(notified_at=now):
        return False
    flag = AnomalyFlag.objects.select_related("account__user", "account__tier").get(pk=flag_id)
    try:
        body = render_to_string("emails/staff_anomaly.txt", {"flag": flag, "site_url": settings.SITE_URL})
        mail_admins(f"Anomaly: {flag.account.user} — {flag.get_rule_display()}", body)
    except Exception:
        AnomalyFlag.objects.filter(pk=flag_id, notified_at=now).update(notified_at=None)
        raise
    return True


def anomaly_flag_resolve(*, flag_id: int, note: str, actor: str) -> AnomalyFlag:
    """Support closes a flag with a note. The anomaly hold is lifted when no other
    open flag of the account holds it."""
    if not note or not note.strip():
        raise ApplicationError("Say how the flag was resolved.", code="reason_required")
    with transaction.atomic():
        flag = AnomalyFlag.objects.select_for_update().get(pk=flag_id)
        if flag.status == AnomalyFlag.Status.RESOLVED:
            return flag
        flag.status, flag.resolved_at = AnomalyFlag.Status.RESOLVED, timezone.now()
        flag.resolved_by, flag.resolution_note = actor, note.strip()
        flag.full_clean()
        flag.save(update_fields=["status", "resolved_at", "resolved_by", "resolution_note"])
        account = Account.objects.select_for_update(of=("self",)).select_related("tier").get(pk=flag.account_id)
        still_held = AnomalyFlag.objects.filter(account=account, status=AnomalyFlag.Status.OPEN, held=True).exists()
        lifted = account.anomaly_hold and not still_held
        if lifted:
            account.anomaly_hold = False
            account.save(update_fields=["anomaly_hold"])
            account_apply_terms(account=account)
        audit_record(ctx=RequestContext(actor=actor), user_id=account.user_id, action="anomaly_resolve",
                     result="hold_lifted" if lifted else "resolved", detail={"flagId": flag.pk, "note": flag.resolution_note})
    return flag
