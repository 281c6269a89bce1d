"""Alerts' Prometheus figures: alert events by kind and delivery status, read from the database
at scrape time; alerts sent are counted where they are sent. Connected from AlertsConfig.ready."""
from __future__ import annotations

from django.db.models import Count
from prometheus_client.core import CounterMetricFamily

from consensus_tokens import metrics

from .models import AlertEvent


class AlertEventsCollector:
    def describe(self):
        return [CounterMetricFamily("ct_alert_events", "")]

    def collect(self):
        events = CounterMetricFamily("ct_alert_events", "Alerts recorded, by kind and delivery status.",
                                     labels=["kind", "status"])
        for kind, status, n in AlertEvent.objects.values_list("kind", "status").annotate(n=Count("id")).order_by():
            events.add_metric([kind, status], n)
        yield events


def connect() -> None:
    metrics.register_database_metrics(AlertEventsCollector())
    for kind in AlertEvent.Kind.values:  # known label values start at 0 for the first scrape
        metrics.alerts_sent.labels(kind=kind)
