import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "consensus_tokens.settings.local")

app = Celery("consensus_tokens")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
