"""Celery tasks: each takes ids, calls one service. Periodic ones are safe to run
twice (the services lock and check before they act); a run that fails is picked
up by the next one. schedule.py declares which run periodically."""
from __future__ import annotations

from celery import shared_task

from consensus_tokens.jobs import run_locked

from . import services
from .services.comps import comps_expire
from .services.plan_changes import plan_changes_resume


@shared_task(name="billing.tasks.overage_invoice_period_task")
def overage_invoice_period_task(period_id: int, reason: str = "period_end") -> int | None:
    invoice = services.overage_invoice_period(period_id=period_id, reason=reason)
    return invoice.pk if invoice is not None else None


@shared_task(name="billing.tasks.overage_bill_ended_periods_task")
def overage_bill_ended_periods_task(account_id: int | None = None) -> list[int]:
    return services.overage_bill_ended_periods(account_id=account_id)


@shared_task(name="billing.tasks.overage_bill_thresholds_task")
def overage_bill_thresholds_task() -> list[int]:
    return services.overage_bill_thresholds()


@shared_task(name="billing.tasks.billing_holds_apply_task")
def billing_holds_apply_task() -> int:
    return services.billing_holds_apply()


@shared_task(name="billing.tasks.subscriptions_expire_task")
def subscriptions_expire_task() -> int:
    return services.subscriptions_expire()


@shared_task(name="billing.tasks.webhook_payloads_prune_task")
def webhook_payloads_prune_task() -> int | str:
    return run_locked("webhook_payloads_prune", services.webhook_payloads_prune)


@shared_task(name="billing.tasks.comps_expire_task")
def comps_expire_task() -> int:
    return comps_expire()


@shared_task(name="billing.tasks.plan_changes_resume_task")
def plan_changes_resume_task() -> list[int]:
    return plan_changes_resume()
