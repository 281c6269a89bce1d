from django.apps import AppConfig


class MeteringConfig(AppConfig):
    name = "metering"
    verbose_name = "Metering"

    def ready(self) -> None:
        from . import metrics

        metrics.connect()
