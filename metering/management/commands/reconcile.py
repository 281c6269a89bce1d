from django.core.management.base import BaseCommand, CommandError

from metering.services import ledger_misattributed, reconcile


class Command(BaseCommand):
    help = ("Prove every period's counters equal the sum of its ledger, every period stays within its cap "
            "(used + reserved <= cap, now and at every consumption recorded) and each ledger row names an "
            "existing period and its account.")

    def handle(self, *args, **options):
        found = reconcile()
        for d in found.drifts:
            self.stdout.write(f"DRIFT period={d.period_id} user={d.user_id} used={d.used} ledger={d.ledger_used} "
                              f"reserved={d.reserved} ledger_reserved={d.ledger_reserved}")
        for o in found.over_cap:
            self.stdout.write(f"OVER_CAP period={o.period_id} user={o.user_id} used={o.used} reserved={o.reserved} "
                              f"cap={o.cap} (used + reserved passes the cap by {o.used + o.reserved - o.cap})")
        for p in found.passed_cap:
            self.stdout.write(f"PASSED_CAP period={p.period_id} user={p.user_id} entry={p.entry_id} "
                              f"operation={p.operation_id} used={p.used} reserved={p.reserved} cap={p.cap} "
                              f"(the answer it stored passed the cap by {p.used + p.reserved - p.cap})")
        misattributed = ledger_misattributed()
        if misattributed:
            self.stdout.write(f"MISATTRIBUTED ledger rows (no such period, or the account is not the period's): {misattributed}")
        if found or misattributed:
            raise CommandError(f"{len(found.drifts)} period(s) drift from the ledger; "
                               f"{len(found.over_cap)} period(s) are over their cap; "
                               f"{len(found.passed_cap)} consumption(s) took their period past its cap; "
                               f"{len(misattributed)} ledger row(s) name a missing period or another account than their period's.")
        self.stdout.write("OK: every period's counters equal its ledger and stay within its cap (now and at every "
                          "consumption), and every ledger row names its period and that period's account.")
