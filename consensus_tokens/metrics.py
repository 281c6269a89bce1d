"""Prometheus metrics: request metrics, our own counters, and the endpoint that serves them.

Other apps count with the helpers here, e.g. `metrics.tokens_consumed.inc(n)`,
`metrics.alerts_sent.labels(kind="threshold").inc()`,
`metrics.overage_billed_cents.inc(cents)`. An increment is a few microseconds.

Under gunicorn set PROMETHEUS_MULTIPROC_DIR (consensus_tokens/gunicorn.conf.py
does) so every worker writes its samples to shared files and a scrape adds them
up; without it the process's own registry is served. State that lives in the
database (open reservations, webhook triggers) is read at scrape time, so it is
the same whichever worker answers.
"""
from __future__ import annotations

import hmac
import os
import time

from django.conf import settings
from django.db import transaction
from django.http import HttpResponse, JsonResponse
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client import disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from consensus_tokens.errors import error_body

# No `*_created` series: they double what is scraped and nothing here reads them.
disable_created_metrics()

# --- request metrics -----------------------------------------------------------------------------

http_requests = Counter("ct_http_requests_total", "HTTP requests answered.", ["method", "route", "status"])
http_request_duration = Histogram(
    "ct_http_request_duration_seconds", "Time to answer an HTTP request.", ["route"],
    buckets=(0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10))

# --- our counters (helpers other apps call) ------------------------------------------------------

tokens_consumed = Counter("ct_tokens_consumed_total", "Tokens recorded as used (committed).")
refused = Counter("ct_token_requests_refused_total", "Token API requests refused, by error code.", ["reason"])
ratelimit_refused = Counter("ct_ratelimit_refused_total", "Requests refused by a rate limit.", ["scope"])
ratelimit_backend_errors = Counter(
    "ct_ratelimit_backend_errors_total", "Requests let through because the rate limit store was unreachable.")
reservations_expired = Counter("ct_reservations_expired_total", "Holds expired by the cleanup job.")
alerts_sent = Counter("ct_alerts_sent_total", "Alerts sent to users or staff.", ["kind"])
webhooks = Counter("ct_webhooks_total", "Stripe webhooks received, by outcome.", ["result"])
overage_billed_cents = Counter("ct_overage_billed_cents_total", "Overage billed to customers, in US cents.")


def webhook_processed() -> None:
    webhooks.labels(result="processed").inc()


def webhook_failed() -> None:
    webhooks.labels(result="failed").inc()


# --- the request middleware ----------------------------------------------------------------------

_TOKEN_API = "/api/tokens/"


class RequestMetricsMiddleware:
    """Counts and times every request by route (the URL pattern, not the path, so
    label values stay few), and counts token API refusals by their error code."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        start = time.perf_counter()
        response = self.get_response(request)
        match = getattr(request, "resolver_match", None)
        route = match.route if match is not None else "<unmatched>"
        http_request_duration.labels(route).observe(time.perf_counter() - start)
        http_requests.labels(request.method, route, str(response.status_code)).inc()
        if response.status_code >= 400 and request.path_info.startswith(_TOKEN_API):
            data = getattr(response, "data", None)
            code = data.get("error", {}).get("code") if isinstance(data, dict) else None
            refused.labels(reason=code or str(response.status_code)).inc()
        return response


# --- state read from the database at scrape time -------------------------------------------------

class DatabaseCollector:
    """Reservations by status, Stripe webhook triggers by outcome, alert events by kind
    and status, overage invoice items by state: counted in the database, so the same
    whichever worker is scraped and right after a restart."""

    def describe(self):
        """The names, without a query: registering a collector otherwise calls collect()."""
        return [GaugeMetricFamily("ct_reservations_open", ""), GaugeMetricFamily("ct_reservations_open_tokens", ""),
                CounterMetricFamily("ct_reservations_finished", ""), CounterMetricFamily("ct_webhook_triggers", ""),
                CounterMetricFamily("ct_alert_events", ""), CounterMetricFamily("ct_overage_invoice_items", ""),
                CounterMetricFamily("ct_overage_invoiced_cents", "")]

    def collect(self):
        from django.db.models import Count, Q, Sum
        from djstripe.models import WebhookEventTrigger

        from metering.models import Reservation

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
        triggers = WebhookEventTrigger.objects.aggregate(
            processed=Count("id", filter=Q(valid=True, processed=True)),
            failed=Count("id", filter=~Q(exception="")),
            invalid=Count("id", filter=Q(valid=False)))
        stored = CounterMetricFamily("ct_webhook_triggers", "Stripe webhook deliveries stored by dj-stripe.",
                                     labels=["result"])
        for result, n in triggers.items():
            stored.add_metric([result], n)
        yield stored
        from alerts.models import AlertEvent

        events = CounterMetricFamily("ct_alert_events", "Alerts recorded, by kind and delivery status.",
                                     labels=["kind", "status"])
        for kind, status, n in AlertEvent.objects.values_list("kind", "status").annotate(n=Count("id")).order_by():
            events.add_metric([kind, status], n)
        yield events
        from billing.models import OverageInvoice

        rows = OverageInvoice.objects.values_list("state").annotate(n=Count("id"), cents=Sum("amount_cents")).order_by()
        items = CounterMetricFamily("ct_overage_invoice_items", "Overage invoice items, by state.", labels=["state"])
        cents = CounterMetricFamily("ct_overage_invoiced_cents", "Overage billed through Stripe, in US cents, by "
                                    "state of its invoice item.", labels=["state"])
        for state, n, amount in rows:
            items.add_metric([state], n)
            cents.add_metric([state], amount or 0)
        yield items
        yield cents


_database = DatabaseCollector()
REGISTRY.register(_database)  # single process: the default registry serves it all


def _registry() -> CollectorRegistry:
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return REGISTRY
    from prometheus_client import multiprocess

    registry = CollectorRegistry()  # per scrape, as prometheus_client's multiprocess mode wants
    multiprocess.MultiProcessCollector(registry)
    registry.register(_database)
    return registry


def metrics_view(request):
    """GET /metrics in Prometheus' text format. With METRICS_TOKEN set, only for
    `Authorization: Bearer <token>` (the endpoint is also meant to stay off the
    public load balancer)."""
    token = settings.METRICS_TOKEN
    if token:
        given = request.headers.get("Authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            return JsonResponse(error_body("not_authenticated", "A metrics token is required."), status=401)
    return HttpResponse(generate_latest(_registry()), content_type=CONTENT_TYPE_LATEST)


# --- receivers: counting what other parts announce -----------------------------------------------

def _on_usage_recorded(sender, period, used_before, **kwargs) -> None:
    grown = period.used - used_before
    if grown > 0:
        transaction.on_commit(lambda: tokens_consumed.inc(grown))


def _on_usage_recorded_many(sender, changes, **kwargs) -> None:
    grown = sum(period.used - used_before for period, used_before in changes)
    if grown > 0:
        transaction.on_commit(lambda: tokens_consumed.inc(grown))


def _on_webhook_validated(sender, instance, valid, **kwargs) -> None:
    if not valid:
        webhooks.labels(result="invalid").inc()


def _on_webhook_processed(sender, instance, **kwargs) -> None:
    transaction.on_commit(webhook_processed)


def _on_webhook_error(sender, instance, **kwargs) -> None:
    webhook_failed()


def connect_receivers() -> None:
    from djstripe import signals as djstripe_signals

    from metering.signals import usage_recorded, usage_recorded_many

    # Known label values start at 0, so a scrape shows them before the first event.
    for result in ("processed", "failed", "invalid"):
        webhooks.labels(result=result)
    from alerts.models import AlertEvent

    for kind in AlertEvent.Kind.values:
        alerts_sent.labels(kind=kind)

    usage_recorded.connect(_on_usage_recorded, dispatch_uid="metrics.tokens_consumed")
    usage_recorded_many.connect(_on_usage_recorded_many, dispatch_uid="metrics.tokens_consumed_many")
    djstripe_signals.webhook_post_validate.connect(_on_webhook_validated, dispatch_uid="metrics.webhook_valid")
    djstripe_signals.webhook_post_process.connect(_on_webhook_processed, dispatch_uid="metrics.webhook_processed")
    djstripe_signals.webhook_processing_error.connect(_on_webhook_error, dispatch_uid="metrics.webhook_error")
