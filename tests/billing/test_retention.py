"""Webhook payload retention (billing/services/retention.py), moved from alerts' cleanup job."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone as dt_timezone

import pytest
import time_machine
from djstripe.models import WebhookEventTrigger

from billing.tasks import webhook_payloads_prune_task

NOW = datetime(2026, 11, 10, 2, 0, tzinfo=dt_timezone.utc)


@pytest.mark.django_db
def test_webhook_payloads_past_retention_are_pruned_once(settings):
    settings.WEBHOOK_RETENTION_DAYS = 7
    old_hook = WebhookEventTrigger.objects.create(remote_ip="127.0.0.1", headers={}, body="{}")
    new_hook = WebhookEventTrigger.objects.create(remote_ip="127.0.0.1", headers={}, body="{}")
    WebhookEventTrigger.objects.filter(pk=old_hook.pk).update(created=NOW - timedelta(days=8))
    WebhookEventTrigger.objects.filter(pk=new_hook.pk).update(created=NOW - timedelta(days=6))

    with time_machine.travel(NOW, tick=False):
        assert webhook_payloads_prune_task.delay().get() == 1
        assert webhook_payloads_prune_task.delay().get() == 0
    assert list(WebhookEventTrigger.objects.values_list("pk", flat=True)) == [new_hook.pk]
