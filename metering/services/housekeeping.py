"""The bodies of metering's periodic jobs (metering/schedule.py): expired holds
written to the ledger, audit rows past their retention deleted, ended periods
closed, and the counters proved against the ledger and the caps. Each is safe to
run twice, late or concurrently: the rules they call lock or skip what another run
holds."""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from django.conf import settings
from django.core.mail import mail_admins
from django.template.loader import render_to_string
from django.utils import timezone

from consensus_tokens.jobs import delete_in_chunks

from ..models import AuditLog
from .reconcile import Reconciliation, reconcile
from .rollover import periods_rollover
from .usage import reservations_expire_stale

EXPIRE_BATCH = 1000


def reservations_expiry_run(*, now: datetime | None = None) -> int:
    """Write every hold past its expiry to the ledger (a release, reason "expired"); returns
    how many. Its tokens were free from the moment it expired (reads count live holds only,
    writes expire a period's holds first): this makes the ledger say so within a minute."""
    now = now or timezone.now()
    expired = 0
    while True:
        batch = reservations_expire_stale(now=now, limit=EXPIRE_BATCH)
        expired += batch
        if batch < EXPIRE_BATCH:
            return expired


@dataclass(frozen=True)
class CleanupResult:
    audit_rows_pruned: int


def cleanup_run(*, now: datetime | None = None) -> CleanupResult:
    """Delete audit rows older than AUDIT_RETENTION_DAYS. Never the ledger."""
    now = now or timezone.now()
    cutoff = now - timedelta(days=settings.AUDIT_RETENTION_DAYS)
    return CleanupResult(delete_in_chunks(AuditLog.objects.filter(created_at__lt=cutoff)))


def rollover_run(*, now: datetime | None = None) -> int:
    """Close every ended period and open the next; returns how many were closed.
    Each closed period is announced (`period_closed`) in its closing transaction."""
    now = now or timezone.now()
    closed = 0
    while rolled := periods_rollover(now=now):
        closed += len(rolled)
    return closed


def reconcile_run() -> Reconciliation:
    """Counters vs ledger, and every period's cap, for every period; anything found is
    e-mailed to staff (ADMINS, from STAFF_EMAILS). Nothing is corrected here: it needs a person."""
    found = reconcile()
    if found:
        body = render_to_string("emails/staff_reconcile_drift.txt", {
            "drifts": found.drifts[:200], "count": len(found.drifts),
            "over_cap": found.over_cap[:200], "over_cap_count": len(found.over_cap),
            "passed_cap": found.passed_cap[:200], "passed_cap_count": len(found.passed_cap)})
        mail_admins(found.summary(), body)
    return found
