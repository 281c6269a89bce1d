"""The project's own app config: connects the rate limit receivers and
registers the OpenAPI extensions once Django is ready."""
from django.apps import AppConfig


class OpsConfig(AppConfig):
    name = "consensus_tokens"
    label = "consensus_tokens"
    verbose_name = "Consensus Tokens operations"

    def ready(self) -> None:
        from consensus_tokens import ratelimit, schema  # noqa: F401 - schema registers its extension

        ratelimit.connect_receivers()
