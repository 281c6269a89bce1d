"""Entry points from metering's signals. A receiver calls one alerts service and
nothing else; it runs inside the transaction that changed the usage or closed the period."""
from django.dispatch import receiver

from metering.signals import period_closed, usage_recorded, usage_recorded_many

from .services import alert_crossings_record, period_summary_record


@receiver(usage_recorded, dispatch_uid="alerts.usage_recorded")
def on_usage_recorded(sender, period, used_before, **kwargs):
    alert_crossings_record(period=period, used_before=used_before)


@receiver(usage_recorded_many, dispatch_uid="alerts.usage_recorded_many")
def on_usage_recorded_many(sender, changes, **kwargs):
    for period, used_before in changes:
        alert_crossings_record(period=period, used_before=used_before)


@receiver(period_closed, dispatch_uid="alerts.period_closed")
def on_period_closed(sender, period, **kwargs):
    period_summary_record(period=period)
