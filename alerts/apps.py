from django.apps import AppConfig


class AlertsConfig(AppConfig):
    name = "alerts"
    verbose_name = "Alerts"

    def ready(self) -> None:
        from django.conf import settings

        from metering.thresholds import register_usage_thresholds

        from . import metrics, receivers  # noqa: F401  (receivers connects to metering's signals)

        # Metering's fast consume leaves a crossing of these to the path that signals it.
        register_usage_thresholds(lambda: settings.ALERT_THRESHOLDS)
        metrics.connect()
