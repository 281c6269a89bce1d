from django.core.management.base import BaseCommand

from console.services import support_group_ensure


class Command(BaseCommand):
    help = 'Create or update the "support" staff group and its permissions (idempotent; run after migrate).'

    def handle(self, *args, **options):
        group, missing = support_group_ensure()
        self.stdout.write(f"group {group.name}: {group.permissions.count()} permissions")
        for name in missing:
            self.stderr.write(f"missing permission (app not migrated?): {name}")
