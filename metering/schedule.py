"""Metering's periodic jobs; `setup_periodic_tasks` puts them in the beat schedule
(consensus_tokens/beat.py). Crons are UTC, each with its crontab.guru link."""
from consensus_tokens.beat import PeriodicJob


def periodic_jobs() -> list[PeriodicJob]:
    return [
        # a hold's tokens are free the moment it expires (reads count live holds, writes expire
        # a period's holds first); this writes each expiry to the ledger soon after
        PeriodicJob("reservation expiry", "metering.reservations_expire",
                    "Release holds past their expiry (a ledger row each, reason \"expired\").",
                    every_seconds=60),
        # https://crontab.guru/#0_2_*_*_*
        PeriodicJob("cleanup", "metering.cleanup",
                    "Delete audit rows past AUDIT_RETENTION_DAYS (never the ledger).",
                    crontab={"minute": "0", "hour": "2"}),
        # https://crontab.guru/#1_*_*_*_*  (periods follow subscriptions, so check every hour)
        PeriodicJob("period rollover", "metering.rollover",
                    "Close ended periods and open the next; alerts mails each closed period's summary.",
                    crontab={"minute": "1", "hour": "*"}),
        # https://crontab.guru/#30_3_*_*_*
        PeriodicJob("reconciliation", "metering.reconcile",
                    "Counters vs ledger and used + reserved <= cap for every period; findings e-mailed to staff.",
                    crontab={"minute": "30", "hour": "3"}),
        PeriodicJob("ledger rollup refresh", "metering.ledger_rollup_refresh",
                    "Catch the daily rollups behind the dashboard and analytics up with the ledger.",
                    every_seconds=60),
        PeriodicJob("estimate calibration", "metering.calibration_learn",
                    "Learn each provider's estimate calibration (per model and script) from new settlements.",
                    every_seconds=60),
        # https://crontab.guru/#15_4_*_*_*
        PeriodicJob("ledger rollup verify", "metering.ledger_rollup_verify",
                    "Prove the rollups equal the ledger; repair drift.",
                    crontab={"minute": "15", "hour": "4"}),
    ]
