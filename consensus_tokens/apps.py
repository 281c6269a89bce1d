"""The project's own app config (the kernel: errors, logging, middleware, renderers, rate-limit
counting, health and metrics; it imports no app)."""
from django.apps import AppConfig


class OpsConfig(AppConfig):
    name = "consensus_tokens"
    label = "consensus_tokens"
    verbose_name = "Consensus Tokens operations"

    def ready(self) -> None:
        from . import checks  # noqa: F401  (registers the system checks)
