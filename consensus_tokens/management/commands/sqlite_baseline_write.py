from django.core.management.base import BaseCommand

from consensus_tokens.sqlite_baseline import BASELINE_MANIFEST, BASELINE_SQL, baseline_write


class Command(BaseCommand):
    help = ("Migrate a scratch SQLite database from nothing and record it as the baseline "
            "(consensus_tokens/sqlite_baseline.sql.gz and .json). Run after adding a migration; takes about a minute.")

    def handle(self, *args, **options):
        manifest = baseline_write()
        self.stdout.write(f"wrote {BASELINE_SQL.name} ({BASELINE_SQL.stat().st_size // 1024} KiB) and "
                          f"{BASELINE_MANIFEST.name}: {len(manifest['migrations'])} migrations")
