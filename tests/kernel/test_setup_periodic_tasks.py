"""The beat schedule assembled from each app's schedule.py (consensus_tokens/beat.py)
by the kernel's setup_periodic_tasks command."""
from __future__ import annotations

from io import StringIO

import pytest
from django.core.exceptions import ImproperlyConfigured
from django.core.management import call_command
from django_celery_beat.models import CrontabSchedule, PeriodicTask

from consensus_tokens.beat import PeriodicJob, periodic_jobs_discover
from consensus_tokens.celery import app as celery_app
from consensus_tokens.management.commands import setup_periodic_tasks
from consensus_tokens.management.commands.setup_periodic_tasks import entry_description

pytestmark = pytest.mark.django_db

METERING_JOBS = {"reservation expiry", "cleanup", "period rollover", "reconciliation", "ledger rollup refresh",
                 "ledger rollup verify", "estimate calibration"}
ALERTS_JOBS = {"weekly digest", "anomaly detection", "send pending alerts"}
BILLING_JOBS = {"billing: bill ended periods' overage", "billing: bill overage past a tier's threshold",
                "billing: hold accounts past the payment grace period", "billing: end access of canceled subscriptions",
                "billing: end comps on their date", "billing: resume unfinished plan changes",
                "billing: prune old webhook payloads"}


def setup(*args: str) -> str:
    out = StringIO()
    call_command("setup_periodic_tasks", *args, stdout=out)
    return out.getvalue()


def test_setup_periodic_tasks_is_idempotent_and_keeps_staff_edits():
    setup()
    setup()
    tasks = {t.name: t for t in PeriodicTask.objects.select_related("crontab", "interval")}
    declared = {job.name: job.declared_in for job in periodic_jobs_discover()}
    assert set(tasks) == set(declared)
    assert {name for name, app in declared.items() if app == "metering.schedule"} == METERING_JOBS
    assert {name for name, app in declared.items() if app == "alerts.schedule"} == ALERTS_JOBS
    assert {name for name, app in declared.items() if app == "billing.schedule"} == BILLING_JOBS
    assert tasks["ledger rollup refresh"].interval.every == 60
    assert tasks["reservation expiry"].interval.every == 60
    assert tasks["reservation expiry"].task == "metering.reservations_expire"
    assert tasks["billing: bill ended periods' overage"].task == "billing.tasks.overage_bill_ended_periods_task"

    def cron(name):
        c = tasks[name].crontab
        return (c.minute, c.hour, c.day_of_week, c.day_of_month, c.month_of_year, str(c.timezone))

    assert cron("cleanup") == ("0", "2", "*", "*", "*", "UTC")
    assert cron("billing: prune old webhook payloads") == ("0", "2", "*", "*", "*", "UTC")
    assert cron("period rollover") == ("1", "*", "*", "*", "*", "UTC")
    assert cron("weekly digest") == ("0", "10", "0", "*", "*", "UTC")
    assert cron("reconciliation")[:2] == ("30", "3") and cron("anomaly detection")[:2] == ("5", "*")
    assert tasks["send pending alerts"].interval.every == 300 and tasks["cleanup"].task == "metering.cleanup"
    assert tasks["period rollover"].task == "metering.rollover" and tasks["reconciliation"].task == "metering.reconcile"
    assert tasks["cleanup"].description.startswith("Delete audit rows past AUDIT_RETENTION_DAYS")
    assert "(declared in metering.schedule; kept by setup_periodic_tasks)" in tasks["cleanup"].description

    cleanup = tasks["cleanup"]
    cleanup.enabled = False
    cleanup.save()
    setup()
    assert PeriodicTask.objects.get(name="cleanup").enabled is False  # a staff edit survives a deploy
    setup("--reset")
    assert PeriodicTask.objects.get(name="cleanup").enabled is True
    assert PeriodicTask.objects.filter(name__in=tasks).count() == len(periodic_jobs_discover()) == len(declared)


def test_every_declared_job_names_a_registered_task():
    celery_app.loader.import_default_modules()
    assert {job.task for job in periodic_jobs_discover()} <= set(celery_app.tasks)
    assert {job.declared_in for job in periodic_jobs_discover()} == {"metering.schedule", "billing.schedule",
                                                                     "alerts.schedule"}


def test_the_entries_alerts_owned_before_follow_their_tasks_to_metering_keeping_staff_edits():
    """The entries the command wrote when alerts ran the housekeeping (task names
    alerts.cleanup, alerts.rollover, alerts.reconcile, now unregistered): the next
    deploy points them at metering's tasks; staff's switch and schedule stay."""
    nightly = CrontabSchedule.objects.create(minute="45", hour="1", timezone="UTC")
    hourly = CrontabSchedule.objects.create(minute="1", hour="*", timezone="UTC")
    PeriodicTask.objects.create(name="cleanup", task="alerts.cleanup", crontab=nightly, enabled=False,
                                description="Expire stale reservations; prune audit rows and old webhook payloads.")
    PeriodicTask.objects.create(name="period rollover", task="alerts.rollover", crontab=hourly,
                                description="Close ended periods, open the next, send period summaries.")
    PeriodicTask.objects.create(name="reconciliation", task="alerts.reconcile", crontab=nightly,
                                description="Counters vs ledger for every period; drift e-mailed to staff.")
    setup()
    assert not PeriodicTask.objects.filter(task__in=["alerts.cleanup", "alerts.rollover", "alerts.reconcile"]).exists()
    cleanup = PeriodicTask.objects.get(name="cleanup")
    assert (cleanup.task, cleanup.enabled, cleanup.crontab_id) == ("metering.cleanup", False, nightly.pk)
    assert PeriodicTask.objects.get(name="period rollover").task == "metering.rollover"
    assert PeriodicTask.objects.get(name="reconciliation").task == "metering.reconcile"
    celery_app.loader.import_default_modules()
    assert set(PeriodicTask.objects.values_list("task", flat=True)) <= set(celery_app.tasks)


def test_an_entry_written_for_a_job_no_longer_declared_is_removed_but_staff_entries_stay(monkeypatch):
    renamed = PeriodicJob("metering: cleanup", "metering.cleanup_v0", "The old name of a job.",
                          crontab={"minute": "0", "hour": "2"}, declared_in="metering.schedule")
    monkeypatch.setattr(setup_periodic_tasks, "periodic_jobs_discover", lambda: [*periodic_jobs_discover(), renamed])
    setup()
    assert PeriodicTask.objects.filter(name="metering: cleanup", task="metering.cleanup_v0").exists()
    monkeypatch.undo()

    nightly = CrontabSchedule.objects.create(minute="0", hour="5", timezone="UTC")
    PeriodicTask.objects.create(name="one-off verify", task="metering.ledger_rollup_verify", crontab=nightly,
                                description="Made by hand while chasing a drift.")
    PeriodicTask.objects.create(name="staff's own", task="metering.gone", crontab=nightly, description="")
    out = setup()
    assert "removed  metering: cleanup (metering.cleanup_v0: no app declares it now)" in out
    assert not PeriodicTask.objects.filter(name="metering: cleanup").exists()
    assert set(PeriodicTask.objects.filter(name__in=["one-off verify", "staff's own"]).values_list("name", flat=True)) \
        == {"one-off verify", "staff's own"}
    assert PeriodicTask.objects.count() == len(periodic_jobs_discover()) + 2
    assert entry_description(periodic_jobs_discover()[0]).endswith(setup_periodic_tasks.OWNED_SUFFIX)


def test_two_apps_declaring_one_job_name_is_a_configuration_error(monkeypatch):
    import metering.schedule

    monkeypatch.setattr(metering.schedule, "periodic_jobs", lambda: [
        PeriodicJob("weekly digest", "metering.cleanup", "A clash with alerts' job.", every_seconds=60)])
    with pytest.raises(ImproperlyConfigured, match="'weekly digest' is declared in both"):
        periodic_jobs_discover()


def test_a_job_has_exactly_one_kind_of_schedule():
    with pytest.raises(ImproperlyConfigured):
        PeriodicJob("both", "x", "why", crontab={"minute": "0"}, every_seconds=60)
    with pytest.raises(ImproperlyConfigured):
        PeriodicJob("neither", "x", "why")
