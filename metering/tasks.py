"""Metering's periodic jobs. Each takes no arguments, calls one service and is
safe to run twice (runs queue on the rollup state's row lock)."""
from __future__ import annotations

from celery import shared_task

from .services import ledger_rollup_refresh, ledger_rollup_verify


@shared_task(name="metering.ledger_rollup_refresh", ignore_result=True)
def ledger_rollup_refresh_task() -> dict[str, int]:
    """Catch DailyUsage up with the ledger. Schedule every minute."""
    run = ledger_rollup_refresh()
    return {"watermarkId": run.watermark_id, "rowsRead": run.rows_read, "groupsWritten": run.groups_written,
            "pending": run.pending}


@shared_task(name="metering.ledger_rollup_verify", ignore_result=True)
def ledger_rollup_verify_task() -> int:
    """Prove DailyUsage equals the ledger; repair and report any group that does
    not. Schedule daily, off-peak."""
    return len(ledger_rollup_verify(repair=True))
