from django.apps import AppConfig


class AlertsConfig(AppConfig):
    name = "alerts"
    verbose_name = "Alerts"

    def ready(self) -> None:
        from django.conf import settings

        from metering.thresholds import register_usage_thresholds

        from . import receivers  # noqa: F401  (connects the metering signal receivers)

        # Metering's fast consume leaves a crossing of these to the path that signals it.
        register_usage_thresholds(lambda: settings.ALERT_THRESHOLDS)
