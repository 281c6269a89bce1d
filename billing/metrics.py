"""Billing's Prometheus figures: Stripe webhooks by outcome (counted as dj-stripe announces them,
and the deliveries it stored, read at scrape time) and overage invoice items by state.
Connected from BillingConfig.ready."""
from __future__ import annotations

from django.db import transaction
from django.db.models import Count, Q, Sum
from djstripe import signals as djstripe_signals
from djstripe.models import WebhookEventTrigger
from prometheus_client.core import CounterMetricFamily

from consensus_tokens import metrics

from .models import OverageInvoice


class BillingCollector:
    def describe(self):
        return [CounterMetricFamily("ct_webhook_triggers", ""), CounterMetricFamily("ct_overage_invoice_items", ""),
                CounterMetricFamily("ct_overage_invoiced_cents", "")]

    def collect(self):
        triggers = WebhookEventTrigger.objects.aggregate(
            processed=Count("id", filter=Q(valid=True, processed=True)),
            failed=Count("id", filter=~Q(exception="")),
            invalid=Count("id", filter=Q(valid=False)))
        stored = CounterMetricFamily("ct_webhook_triggers", "Stripe webhook deliveries stored by dj-stripe.",
                                     labels=["result"])
        for result, n in triggers.items():
            stored.add_metric([result], n)
        yield stored
        rows = OverageInvoice.objects.values_list("state").annotate(n=Count("id"), cents=Sum("amount_cents")).order_by()
        items = CounterMetricFamily("ct_overage_invoice_items", "Overage invoice items, by state.", labels=["state"])
        cents = CounterMetricFamily("ct_overage_invoiced_cents", "Overage billed through Stripe, in US cents, by "
                                    "state of its invoice item.", labels=["state"])
        for state, n, amount in rows:
            items.add_metric([state], n)
            cents.add_metric([state], amount or 0)
        yield items
        yield cents


def _on_webhook_validated(sender, instance, valid, **kwargs) -> None:
    if not valid:
        metrics.webhooks.labels(result="invalid").inc()


def _on_webhook_processed(sender, instance, **kwargs) -> None:
    transaction.on_commit(metrics.webhook_processed)


def _on_webhook_error(sender, instance, **kwargs) -> None:
    metrics.webhook_failed()


def connect() -> None:
    metrics.register_database_metrics(BillingCollector())
    for result in ("processed", "failed", "invalid"):  # known label values start at 0 for the first scrape
        metrics.webhooks.labels(result=result)
    djstripe_signals.webhook_post_validate.connect(_on_webhook_validated, dispatch_uid="metrics.webhook_valid")
    djstripe_signals.webhook_post_process.connect(_on_webhook_processed, dispatch_uid="metrics.webhook_processed")
    djstripe_signals.webhook_processing_error.connect(_on_webhook_error, dispatch_uid="metrics.webhook_error")
