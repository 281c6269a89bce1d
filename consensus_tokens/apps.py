"""The project's own app config: connects the operational receivers (metrics,
audit rows for admin changes) once Django is ready."""
from django.apps import AppConfig


class OpsConfig(AppConfig):
    name = "consensus_tokens"
    label = "consensus_tokens"
    verbose_name = "Consensus Tokens operations"

    def ready(self) -> None:
        from django.contrib.admin.models import LogEntry
        from django.db.models.signals import post_save

        from consensus_tokens import audit_admin, metrics, schema  # noqa: F401 - schema registers its extension

        metrics.connect_receivers()
        post_save.connect(audit_admin.admin_change_audited, sender=LogEntry, dispatch_uid="audit.admin_change")
