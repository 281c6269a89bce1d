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
from django.http import HttpResponse, JsonResponse
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client import disable_created_metrics

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
consume_groups = Counter("ct_consume_groups_total",
                         "Statements that wrote several single consumes at once (group commit).")
consume_grouped = Counter("ct_consume_grouped_total", "Single consumes written in a group (group commit).")
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
    """What the apps count in the database at scrape time (reservations, webhook deliveries,
    alert events, overage invoices), so a figure is the same whichever worker is scraped and
    right after a restart. Each app registers its own collector (an object with describe()
    and collect(), as prometheus_client wants) from its AppConfig.ready."""

    def __init__(self) -> None:
        self.collectors: list = []

    def register(self, collector) -> None:
        if collector not in self.collectors:
            self.collectors.append(collector)

    def describe(self):
        """The names, without a query: registering a collector otherwise calls collect()."""
        return [family for collector in self.collectors for family in collector.describe()]

    def collect(self):
        for collector in self.collectors:
            yield from collector.collect()


_database = DatabaseCollector()
register_database_metrics = _database.register
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
    public load balancer); without one, only where METRICS_PUBLIC says so (not
    production's default), else 403."""
    token = settings.METRICS_TOKEN
    if token:
        given = request.headers.get("Authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            return JsonResponse(error_body("not_authenticated", "A metrics token is required."), status=401)
    elif not settings.METRICS_PUBLIC:
        return JsonResponse(error_body("permission_denied", "Metrics are not served without a token here."),
                            status=403)
    return HttpResponse(generate_latest(_registry()), content_type=CONTENT_TYPE_LATEST)
