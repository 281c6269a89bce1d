"""Metering's business rules. Views, admin, tasks and other apps call these."""
from .accounts import (
    account_apply_terms,
    account_for_user,
    account_terms,
    period_align,
    period_current,
    tier_apply_terms,
)
from .audit import audit_record
from .consume.contract import MAX_BATCH, BatchRefused, ConsumeRequest, ConsumeResult, usage_percentage, usage_status
from .consume.dispatch import usage_consume, usage_consume_batch
from .consume.orm import consume_refused
from .context import SYSTEM, RequestContext
from .estimates import CalibrationRun, calibration_learn_batch, calibration_learn_run, calibration_pick, tokens_estimate
from .housekeeping import CleanupResult, cleanup_run, reconcile_run, reservations_expiry_run, rollover_run
from .keys import service_key_create, service_key_revoke
from .reconcile import (
    CapPassed,
    Drift,
    OverCap,
    Reconciliation,
    consumptions_past_cap,
    ledger_misattributed,
    ledger_reconcile,
    periods_over_cap,
    reconcile,
)
from .rollover import periods_rollover
from .rollups import RollupDrift, RollupRun, ledger_rollup_refresh, ledger_rollup_verify
from .staff import account_change_tier, period_reset, reservation_release_by_support, usage_adjust, usage_grant
from .usage import (
    CheckResult,
    Usage,
    reservation_release,
    reservations_expire_stale,
    usage_check,
    usage_get,
    usage_of,
)

__all__ = [
    "MAX_BATCH", "SYSTEM", "BatchRefused", "CheckResult", "ConsumeRequest", "ConsumeResult", "Drift",
    "RequestContext", "Usage", "account_apply_terms", "account_change_tier", "account_for_user", "account_terms",
    "audit_record", "consume_refused", "ledger_misattributed", "ledger_reconcile", "period_align", "period_current", "period_reset",
    "CalibrationRun", "calibration_learn_batch", "calibration_learn_run", "calibration_pick",
    "reservation_release", "reservation_release_by_support", "reservations_expire_stale", "service_key_create", "service_key_revoke",
    "tier_apply_terms", "tokens_estimate", "usage_adjust", "usage_check", "usage_consume", "usage_consume_batch",
    "usage_get", "usage_grant", "usage_of", "usage_percentage", "usage_status",
    "RollupDrift", "RollupRun", "ledger_rollup_refresh", "ledger_rollup_verify",
    "CleanupResult", "cleanup_run", "periods_rollover", "reconcile_run", "rollover_run",
    "CapPassed", "OverCap", "Reconciliation", "consumptions_past_cap", "periods_over_cap", "reconcile",
    "reservations_expiry_run",
]
