import os

from celery import Celery
from celery.signals import setup_logging

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "consensus_tokens.settings.local")

app = Celery("consensus_tokens")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()


@setup_logging.connect
def _log_through_django(**kwargs) -> None:
    """Workers and beat log through settings.LOGGING (JSON in production, secrets redacted,
    nothing mailed) like the web processes: a receiver of this signal stops Celery from
    replacing the root logger's handlers with its own."""
    from logging.config import dictConfig

    from django.conf import settings

    dictConfig(settings.LOGGING)
