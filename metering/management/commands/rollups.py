"""Bring the daily rollups up to date with the ledger and prove them equal to it."""
from django.core.management.base import BaseCommand, CommandError

from metering.services import ledger_rollup_refresh, ledger_rollup_verify


class Command(BaseCommand):
    help = ("Refresh DailyUsage from the ledger, then prove every group equals the ledger. Exits non-zero on "
            "drift unless --repair, which rewrites drifted groups from the ledger.")

    def add_arguments(self, parser):
        parser.add_argument("--repair", action="store_true", help="rewrite groups that differ from the ledger")
        parser.add_argument("--no-refresh", action="store_true", help="only verify")

    def handle(self, *args, repair: bool = False, no_refresh: bool = False, **options):
        if not no_refresh:
            run = ledger_rollup_refresh()
            self.stdout.write(f"rolled up to ledger id {run.watermark_id} ({run.rows_read} rows read, "
                              f"{run.pending} pending)")
        drifts = ledger_rollup_verify(repair=repair)
        for d in drifts:
            self.stdout.write(f"DRIFT account={d.key[0]} period={d.key[1]} day={d.key[2]} kind={d.key[3]} "
                              f"op={d.key[4] or '-'} provider={d.key[5] or '-'} model={d.key[6] or '-'} "
                              f"ledger={d.ledger} rollup={d.rollup}")
        if drifts and not repair:
            raise CommandError(f"{len(drifts)} rollup group(s) differ from the ledger (run with --repair).")
        self.stdout.write(f"rollups equal the ledger{' after repair' if drifts else ''}")
