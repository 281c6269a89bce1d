"""Write the beat schedule (django-celery-beat's database scheduler) from the
periodic jobs each installed app declares in its schedule.py (consensus_tokens/beat.py).

Run on every deploy; safe to run again. A missing job is created; an existing
one keeps the schedule and on/off switch staff set in admin (only its task
path and description are brought up to date) unless --reset puts the code's
schedule back. An entry this command wrote for a job no app declares any more
(renamed or retired) is deleted; entries staff made are never touched. What
marks an entry as written here is its description's ending (OWNED_SUFFIX).
"""
from django.core.management.base import BaseCommand
from django.db import transaction
from django_celery_beat.models import CrontabSchedule, IntervalSchedule, PeriodicTask

from consensus_tokens.beat import PeriodicJob, periodic_jobs_discover

OWNED_SUFFIX = "; kept by setup_periodic_tasks)"


def entry_description(job: PeriodicJob) -> str:
    return f"{job.why} (declared in {job.declared_in}{OWNED_SUFFIX}"


class Command(BaseCommand):
    help = "Create or update the periodic jobs the apps declare in django-celery-beat's database schedule."

    def add_arguments(self, parser):
        parser.add_argument("--reset", action="store_true", help="Put the code's schedule back on existing jobs.")

    @transaction.atomic
    def handle(self, *args, reset: bool = False, **options):
        jobs = periodic_jobs_discover()
        for job in jobs:
            schedule = self._schedule(job)
            task = PeriodicTask.objects.select_for_update().filter(name=job.name).first()
            if task is None:
                PeriodicTask.objects.create(name=job.name, task=job.task, description=entry_description(job),
                                            **schedule)
                self.stdout.write(f"created  {job.name}")
                continue
            task.task, task.description = job.task, entry_description(job)
            if reset:
                task.crontab = task.interval = task.solar = task.clocked = None
                for field, value in schedule.items():
                    setattr(task, field, value)
                task.enabled = True
            task.save()
            self.stdout.write(f"{'reset' if reset else 'kept':8} {job.name}")
        retired = (PeriodicTask.objects.select_for_update().filter(description__endswith=OWNED_SUFFIX)
                   .exclude(name__in=[job.name for job in jobs]))
        for task in retired:
            task.delete()
            self.stdout.write(f"removed  {task.name} ({task.task}: no app declares it now)")

    @staticmethod
    def _schedule(job: PeriodicJob) -> dict:
        if job.every_seconds is not None:
            interval, _ = IntervalSchedule.objects.get_or_create(every=job.every_seconds,
                                                                 period=IntervalSchedule.SECONDS)
            return {"interval": interval}
        fields = {"minute": "*", "hour": "*", "day_of_week": "*", "day_of_month": "*", "month_of_year": "*",
                  **(job.crontab or {})}
        crontab, _ = CrontabSchedule.objects.get_or_create(**fields, timezone="UTC")
        return {"crontab": crontab}
