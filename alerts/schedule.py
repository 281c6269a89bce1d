"""Alerts' periodic jobs; `setup_periodic_tasks` puts them in the beat schedule
(consensus_tokens/beat.py). Crons are UTC, each with its crontab.guru link."""
from django.conf import settings

from consensus_tokens.beat import PeriodicJob


def periodic_jobs() -> list[PeriodicJob]:
    return [
        # https://crontab.guru/#0_10_*_*_0
        PeriodicJob("weekly digest", "alerts.weekly_digest", "Weekly usage digest to users at or above 75%.",
                    crontab={"minute": "0", "hour": "10", "day_of_week": "0"}),
        # https://crontab.guru/#5_*_*_*_*  (the hour just ended)
        PeriodicJob("anomaly detection", "alerts.detect_anomalies", "Spike and refused-burst rules over the last hour.",
                    crontab={"minute": "5", "hour": "*"}),
        PeriodicJob("send pending alerts", "alerts.send_pending",
                    "Send alerts recorded but not sent (broker or SMTP outage) and unsent staff notices.",
                    every_seconds=settings.ALERTS_RESEND_EVERY_SECONDS),
    ]
