"""Create the beat schedule (django-celery-beat's database scheduler) from code.

Run on every deploy; safe to run again. A missing job is created; an existing
one keeps the schedule and on/off switch staff set in admin (only its task
path is brought up to date) unless --reset puts the code's schedule back.
"""
from dataclasses import dataclass

from django.conf import settings
from django.core.management.base import BaseCommand
from django.db import transaction
from django_celery_beat.models import CrontabSchedule, IntervalSchedule, PeriodicTask

from billing.tasks import PERIODIC as BILLING_PERIODIC


@dataclass(frozen=True)
class Job:
    name: str
    task: str
    description: str
    crontab: dict | None = None  # minute/hour/day_of_week/day_of_month/month_of_year, UTC
    every_seconds: int | None = None


def jobs() -> list[Job]:
    return [
        # https://crontab.guru/#0_2_*_*_*
        Job("cleanup", "alerts.cleanup", "Expire stale reservations; prune audit rows and old webhook payloads.",
            crontab={"minute": "0", "hour": "2"}),
        # https://crontab.guru/#1_*_*_*_*  (periods follow subscriptions, so check every hour)
        Job("period rollover", "alerts.rollover", "Close ended periods, open the next, send period summaries.",
            crontab={"minute": "1", "hour": "*"}),
        # https://crontab.guru/#0_10_*_*_0
        Job("weekly digest", "alerts.weekly_digest", "Weekly usage digest to users at or above 75%.",
            crontab={"minute": "0", "hour": "10", "day_of_week": "0"}),
        # https://crontab.guru/#30_3_*_*_*
        Job("reconciliation", "alerts.reconcile", "Counters vs ledger for every period; drift e-mailed to staff.",
            crontab={"minute": "30", "hour": "3"}),
        # https://crontab.guru/#5_*_*_*_*  (the hour just ended)
        Job("anomaly detection", "alerts.detect_anomalies", "Spike and refused-burst rules over the last hour.",
            crontab={"minute": "5", "hour": "*"}),
        Job("send pending alerts", "alerts.send_pending", "Send alerts recorded but not sent (broker or SMTP outage).",
            every_seconds=settings.ALERTS_RESEND_EVERY_SECONDS),
        # Daily rollups behind the dashboard and analytics.
        Job("ledger rollup refresh", "metering.ledger_rollup_refresh", "Catch the daily rollups up with the ledger.",
            every_seconds=60),
        # https://crontab.guru/#15_4_*_*_*
        Job("ledger rollup verify", "metering.ledger_rollup_verify", "Prove rollups equal the ledger; repair drift.",
            crontab={"minute": "15", "hour": "4"}),
        # Billing's jobs, as billing declares them.
        *(Job(name, task, name, every_seconds=every) for name, (task, every) in BILLING_PERIODIC.items()),
    ]


class Command(BaseCommand):
    help = "Create or update the periodic jobs in django-celery-beat's database schedule."

    def add_arguments(self, parser):
        parser.add_argument("--reset", action="store_true", help="Put the code's schedule back on existing jobs.")

    @transaction.atomic
    def handle(self, *args, reset: bool = False, **options):
        for job in jobs():
            schedule = self._schedule(job)
            task = PeriodicTask.objects.select_for_update().filter(name=job.name).first()
            if task is None:
                PeriodicTask.objects.create(name=job.name, task=job.task, description=job.description, **schedule)
                self.stdout.write(f"created  {job.name}")
                continue
            task.task, task.description = job.task, job.description
            if reset:
                task.crontab = task.interval = task.solar = task.clocked = None
                for field, value in schedule.items():
                    setattr(task, field, value)
                task.enabled = True
            task.save()
            self.stdout.write(f"{'reset' if reset else 'kept':8} {job.name}")

    @staticmethod
    def _schedule(job: Job) -> dict:
        if job.every_seconds is not None:
            interval, _ = IntervalSchedule.objects.get_or_create(every=job.every_seconds,
                                                                 period=IntervalSchedule.SECONDS)
            return {"interval": interval}
        fields = {"minute": "*", "hour": "*", "day_of_week": "*", "day_of_month": "*", "month_of_year": "*",
                  **job.crontab}
        crontab, _ = CrontabSchedule.objects.get_or_create(**fields, timezone="UTC")
        return {"crontab": crontab}
