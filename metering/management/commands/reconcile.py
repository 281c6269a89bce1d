from django.core.management.base import BaseCommand, CommandError

from metering.services import ledger_reconcile


class Command(BaseCommand):
    help = "Prove every period's counters equal the sum of its ledger; report any drift."

    def handle(self, *args, **options):
        drifts = ledger_reconcile()
        for d in drifts:
            self.stdout.write(f"DRIFT period={d.period_id} user={d.user_id} used={d.used} ledger={d.ledger_used} "
                              f"reserved={d.reserved} ledger_reserved={d.ledger_reserved}")
        if drifts:
            raise CommandError(f"{len(drifts)} period(s) drift from the ledger.")
        self.stdout.write("OK: every period's counters equal its ledger.")
