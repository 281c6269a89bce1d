from django.apps import AppConfig


class MeteringConfig(AppConfig):
    name = "metering"
    verbose_name = "Metering"

    def ready(self) -> None:
        from . import auth, metrics, throttling  # noqa: F401  (auth describes its scheme to the schema)

        metrics.connect()
        throttling.connect_receivers()
