"""How long billing keeps what it receives: dj-stripe's stored webhook payloads
are deleted after WEBHOOK_RETENTION_DAYS (what they changed lives on in our
tables and Stripe's). Nothing of the money is ever deleted here."""
from __future__ import annotations

from datetime import datetime, timedelta

from django.conf import settings
from django.utils import timezone
from djstripe.models import WebhookEventTrigger

from consensus_tokens.jobs import delete_in_chunks


def webhook_payloads_prune(*, now: datetime | None = None) -> int:
    """Delete webhook payloads older than WEBHOOK_RETENTION_DAYS, in chunks; returns
    how many. Safe to run twice or concurrently: a row is deleted once."""
    cutoff = (now or timezone.now()) - timedelta(days=settings.WEBHOOK_RETENTION_DAYS)
    return delete_in_chunks(WebhookEventTrigger.objects.filter(created__lt=cutoff))
