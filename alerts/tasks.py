"""Celery tasks: take ids, call a service. Periodic jobs (declared in schedule.py)
take a lock so that concurrent runs leave the work to one of them; each job is
also idempotent on its own, so a repeated or late run changes nothing twice."""
from __future__ import annotations

from typing import Any

from celery import shared_task

from consensus_tokens.jobs import run_locked

from . import services


@shared_task(name="alerts.send", acks_late=True, autoretry_for=(Exception,), retry_backoff=15,
             retry_backoff_max=900, retry_jitter=True, max_retries=6)
def alert_send_task(event_id: int) -> str:
    return services.alert_deliver(event_id=event_id)


@shared_task(name="alerts.anomaly_notify", acks_late=True, autoretry_for=(Exception,), retry_backoff=15,
             retry_backoff_max=900, max_retries=6)
def anomaly_flag_notify_task(flag_id: int) -> bool:
    return services.anomaly_flag_notify(flag_id=flag_id)


@shared_task(name="alerts.send_pending")
def alerts_send_pending_task() -> Any:
    return run_locked("send_pending", services.alerts_send_pending)


@shared_task(name="alerts.weekly_digest")
def weekly_digest_task() -> Any:
    return run_locked("weekly_digest", lambda: len(services.weekly_digests_record()))


@shared_task(name="alerts.detect_anomalies")
def anomalies_detect_task() -> Any:
    return run_locked("detect_anomalies", lambda: [f.pk for f in services.anomalies_detect()])
