"""Celery tasks: each takes ids, calls one service. Periodic ones are safe to run
twice (the services lock and check before they act); a run that fails is picked
up by the next one."""
from __future__ import annotations

from celery import shared_task

from . import services

# The periodic jobs, for the beat schedule (`setup_periodic_tasks`): name -> (task, seconds).
PERIODIC = {
    "billing: bill ended periods' overage": ("billing.tasks.overage_bill_ended_periods_task", 15 * 60),
    "billing: bill overage past a tier's threshold": ("billing.tasks.overage_bill_thresholds_task", 60 * 60),
    "billing: hold accounts past the payment grace period": ("billing.tasks.billing_holds_apply_task", 15 * 60),
    "billing: end access of canceled subscriptions": ("billing.tasks.subscriptions_expire_task", 5 * 60),
}


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
