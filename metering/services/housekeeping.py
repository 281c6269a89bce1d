"""The bodies of metering's periodic jobs (metering/schedule.py): stale holds
released, audit rows past their retention deleted, ended periods closed, and the
counters proved against the ledger. Each is safe to run twice, late or
concurrently: the rules they call lock or skip what another run holds."""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from django.conf import settings
from django.core.mail import mail_admins
from django.template.loader import render_to_string
from django.utils import timezone

from consensus_tokens.jobs import delete_in_chunks

from ..models import AuditLog
from .reconcile import Drift, ledger_reconcile
from .rollover import periods_rollover
from .usage import reservations_expire_stale

EXPIRE_BATCH = 1000


@dataclass(frozen=True)
class CleanupResult:
    reservations_expired: int
    audit_rows_pruned: int


def cleanup_run(*, now: datetime | None = None) -> CleanupResult:
    """Expire stale reservations (releasing their holds, a ledger row each) and
    delete audit rows older than AUDIT_RETENTION_DAYS. Never the ledger."""
    now = now or timezone.now()
    expired = 0
    while True:
        batch = reservations_expire_stale(now=now, limit=EXPIRE_BATCH)
        expired += batch
        if batch < EXPIRE_BATCH:
            break
    cutoff = now - timedelta(days=settings.AUDIT_RETENTION_DAYS)
    return CleanupResult(expired, delete_in_chunks(AuditLog.objects.filter(created_at__lt=cutoff)))


def rollover_run(*, now: datetime | None = None) -> int:
    """Close every ended period and open the next; returns how many were closed.
    Each closed period is announced (`period_closed`) in its closing transaction."""
    now = now or timezone.now()
    closed = 0
    while rolled := periods_rollover(now=now):
        closed += len(rolled)
    return closed


def reconcile_run() -> list[Drift]:
    """Counters vs ledger for every period; any drift is e-mailed to staff (ADMINS,
    from STAFF_EMAILS). Nothing is corrected here: a drift needs a person."""
    drifts = ledger_reconcile()
    if drifts:
        body = render_to_string("emails/staff_reconcile_drift.txt", {"drifts": drifts[:200], "count": len(drifts)})
        mail_admins(f"Ledger drift in {len(drifts)} period(s)", body)
    return drifts
