"""Reads that span apps, for the console's pages: metering's figures with what
billing and alerts add to them. Each app keeps its own rules; these only combine them."""
from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timedelta

from django.db.models import Exists, OuterRef, QuerySet
from django.utils import timezone

from alerts.selectors import anomaly_flags_open
from billing.selectors import comp_in_force_columns, overage_invoices_needing_retry, webhook_triggers_failed
from metering import selectors as metering_selectors
from metering.models import Account
from metering.selectors import SupportNumbers


def accounts_for_console(*, now: datetime | None = None) -> QuerySet[Account]:
    """Accounts with their current period's figures, whether an anomaly flag is open and the
    comp in force (one query)."""
    now = now or timezone.now()
    open_flags = anomaly_flags_open().filter(account=OuterRef("pk"))
    return metering_selectors.accounts_for_console(now=now).annotate(open_flags=Exists(open_flags),
                                                                      **comp_in_force_columns(now=now))


def support_numbers(*, now: datetime | None = None) -> SupportNumbers:
    """The admin landing page's numbers: metering's, then open flags and what needs a retry."""
    now = now or timezone.now()
    return replace(metering_selectors.support_numbers(now=now), extra={
        "open_flags": anomaly_flags_open().count(),
        "failed_invoices": overage_invoices_needing_retry(now=now).count(),
        "failed_webhooks": webhook_triggers_failed(since=now - timedelta(days=7)).count(),
    })
