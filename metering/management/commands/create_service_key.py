from django.core.management.base import BaseCommand

from metering.models import ServiceKey
from metering.services import service_key_create


class Command(BaseCommand):
    help = "Create a service API key. The key is printed once and never stored."

    def add_arguments(self, parser):
        parser.add_argument("name")
        parser.add_argument("--scope", choices=[c for c, _ in ServiceKey.Scope.choices], default="consume")

    def handle(self, *args, name, scope, **options):
        key, raw = service_key_create(name=name, scope=scope)
        self.stdout.write(f"SERVICE_KEY={raw}")
        self.stderr.write(f"Created key {key.prefix}… ({key.scope}, {key.environment}). Store it now: it is not shown again.")
