from django.apps import AppConfig


class BillingConfig(AppConfig):
    name = "billing"
    verbose_name = "Billing"

    def ready(self) -> None:
        from metering.periods import register_period_bounds

        from . import checks, metrics, webhooks  # noqa: F401  (checks registers the system checks, webhooks
        # connects the dj-stripe signal receivers)
        from .services import subscription_period_bounds

        # A lazily opened period of a subscribed account follows its Stripe subscription;
        # accounts without one keep calendar months.
        register_period_bounds(subscription_period_bounds)
        metrics.connect()
