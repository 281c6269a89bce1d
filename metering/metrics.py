"""Metering's Prometheus figures: tokens consumed (counted when a consume commits), holds by
status and each provider's estimate accuracy (read from the database at scrape time). Connected
from MeteringConfig.ready."""
from __future__ import annotations

from django.db import transaction
from django.db.models import Count, Sum
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from consensus_tokens import metrics

from .models import Reservation
from .selectors import estimate_accuracy_by_provider
from .signals import usage_recorded, usage_recorded_many


class ReservationsCollector:
    def describe(self):
        return [GaugeMetricFamily("ct_reservations_open", ""), GaugeMetricFamily("ct_reservations_open_tokens", ""),
                CounterMetricFamily("ct_reservations_finished", "")]

    def collect(self):
        rows = Reservation.objects.values("status").annotate(n=Count("id"), tokens=Sum("tokens"))
        counts = {row["status"]: (row["n"], row["tokens"] or 0) for row in rows}
        held, held_tokens = counts.get(Reservation.Status.HELD, (0, 0))
        open_ = GaugeMetricFamily("ct_reservations_open", "Holds currently placed.")
        open_.add_metric([], held)
        yield open_
        open_tokens = GaugeMetricFamily("ct_reservations_open_tokens", "Tokens held by open reservations.")
        open_tokens.add_metric([], held_tokens)
        yield open_tokens
        finished = CounterMetricFamily("ct_reservations_finished", "Holds that ended, by how.", labels=["status"])
        for status in (Reservation.Status.SETTLED, Reservation.Status.RELEASED, Reservation.Status.EXPIRED):
            finished.add_metric([status], counts.get(status, (0, 0))[0])
        yield finished


class EstimateAccuracyCollector:
    def describe(self):
        return [GaugeMetricFamily("ct_estimate_error_ratio", ""),
                GaugeMetricFamily("ct_estimate_calibration_samples", "")]

    def collect(self):
        error = GaugeMetricFamily("ct_estimate_error_ratio",
                                  "Recent mean absolute error of calibrated estimates (0.1 = 10%).",
                                  labels=["provider"])
        samples = GaugeMetricFamily("ct_estimate_calibration_samples",
                                    "Settled operations the provider's calibrations learnt from.", labels=["provider"])
        for row in estimate_accuracy_by_provider():
            samples.add_metric([row.provider], row.samples)
            if row.recent_error is not None:
                error.add_metric([row.provider], float(row.recent_error))
        yield error
        yield samples


def _on_usage_recorded(sender, period, used_before, **kwargs) -> None:
    grown = period.used - used_before
    if grown > 0:
        transaction.on_commit(lambda: metrics.tokens_consumed.inc(grown))


def _on_usage_recorded_many(sender, changes, **kwargs) -> None:
    grown = sum(period.used - used_before for period, used_before in changes)
    if grown > 0:
        transaction.on_commit(lambda: metrics.tokens_consumed.inc(grown))


def connect() -> None:
    metrics.register_database_metrics(ReservationsCollector())
    metrics.register_database_metrics(EstimateAccuracyCollector())
    usage_recorded.connect(_on_usage_recorded, dispatch_uid="metrics.tokens_consumed")
    usage_recorded_many.connect(_on_usage_recorded_many, dispatch_uid="metrics.tokens_consumed_many")
