"""Billing's periodic jobs; `setup_periodic_tasks` puts them in the beat schedule
(consensus_tokens/beat.py). Crons are UTC, each with its crontab.guru link."""
from consensus_tokens.beat import PeriodicJob


def periodic_jobs() -> list[PeriodicJob]:
    return [
        PeriodicJob("billing: bill ended periods' overage", "billing.tasks.overage_bill_ended_periods_task",
                    "Bill every ended period's overage not billed yet; resume unfinished items.",
                    every_seconds=15 * 60),
        PeriodicJob("billing: bill overage past a tier's threshold", "billing.tasks.overage_bill_thresholds_task",
                    "Bill open periods early once their unbilled overage passes the tier's threshold.",
                    every_seconds=60 * 60),
        PeriodicJob("billing: hold accounts past the payment grace period", "billing.tasks.billing_holds_apply_task",
                    "Hold accounts whose payment failed longer ago than the grace period.",
                    every_seconds=15 * 60),
        PeriodicJob("billing: end access of canceled subscriptions", "billing.tasks.subscriptions_expire_task",
                    "End access for canceled subscriptions whose paid time is over.",
                    every_seconds=5 * 60),
        PeriodicJob("billing: end comps on their date", "billing.tasks.comps_expire_task",
                    "End comps (tiers granted without billing) whose end has come; the account returns to what "
                    "its subscription pays for, or the default tier.",
                    every_seconds=5 * 60),
        PeriodicJob("billing: resume unfinished plan changes", "billing.tasks.plan_changes_resume_task",
                    "Send again, with their own idempotency key, support's plan changes whose Stripe answer was "
                    "never recorded.",
                    every_seconds=15 * 60),
        # https://crontab.guru/#0_2_*_*_*
        PeriodicJob("billing: prune old webhook payloads", "billing.tasks.webhook_payloads_prune_task",
                    "Delete dj-stripe webhook payloads past WEBHOOK_RETENTION_DAYS.",
                    crontab={"minute": "0", "hour": "2"}),
    ]
