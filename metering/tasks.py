"""Metering's periodic jobs (declared in schedule.py). Each takes no arguments,
calls one service and is safe to run twice: the housekeeping jobs also take a
lock so concurrent runs leave the work to one of them; the rollup jobs queue on
the rollup state's row lock."""
from __future__ import annotations

from typing import Any

from celery import shared_task

from consensus_tokens.jobs import run_locked

from .services import (calibration_learn_run, cleanup_run, ledger_rollup_refresh, ledger_rollup_verify, reconcile_run,
                       reservations_expiry_run, rollover_run)


@shared_task(name="metering.cleanup")
def cleanup_task() -> Any:
    return run_locked("cleanup", cleanup_run)


@shared_task(name="metering.reservations_expire", ignore_result=True)
def reservations_expire_task() -> Any:
    """Write expired holds to the ledger. Schedule every minute."""
    return run_locked("reservations_expire", reservations_expiry_run)


@shared_task(name="metering.rollover")
def rollover_task() -> Any:
    return run_locked("rollover", rollover_run)


@shared_task(name="metering.reconcile")
def reconcile_task() -> Any:
    return run_locked("reconcile", lambda: reconcile_run().count)


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


@shared_task(name="metering.calibration_learn", ignore_result=True)
def calibration_learn_task() -> dict[str, int]:
    """Learn the estimate calibrations from newly settled consumptions. Schedule every
    minute: off the consume path, which never waits for it."""
    run = calibration_learn_run()
    return {"cursor": run.cursor, "samples": run.samples, "calibrationsWritten": run.calibrations_written}
