from django.core.management.base import BaseCommand

from consensus_tokens.sqlite_baseline import baseline_load


class Command(BaseCommand):
    help = ("Load the recorded SQLite baseline into an empty SQLite database (run before `migrate`; "
            "does nothing on PostgreSQL, on a database with tables, or when the baseline is out of date).")

    def add_arguments(self, parser):
        parser.add_argument("--database", default="default")

    def handle(self, *args, database, **options):
        result = baseline_load(using=database)
        self.stdout.write(f"sqlite baseline: {result.reason}" if result.loaded
                          else f"sqlite baseline: not loaded: {result.reason}")
