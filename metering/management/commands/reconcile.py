from django.core.management.base import BaseCommand, CommandError

from metering.services import ledger_misattributed, ledger_reconcile


class Command(BaseCommand):
    help = "Prove every period's counters equal the sum of its ledger and each row names an existing period and its account."

    def handle(self, *args, **options):
        drifts = ledger_reconcile()
        for d in drifts:
            self.stdout.write(f"DRIFT period={d.period_id} user={d.user_id} used={d.used} ledger={d.ledger_used} "
                              f"reserved={d.reserved} ledger_reserved={d.ledger_reserved}")
        misattributed = ledger_misattributed()
        if misattributed:
            self.stdout.write(f"MISATTRIBUTED ledger rows (no such period, or the account is not the period's): {misattributed}")
        if drifts or misattributed:
            raise CommandError(f"{len(drifts)} period(s) drift from the ledger; "
                               f"{len(misattributed)} ledger row(s) name a missing period or another account than their period's.")
        self.stdout.write("OK: every period's counters equal its ledger, and every ledger row names its period and that period's account.")
