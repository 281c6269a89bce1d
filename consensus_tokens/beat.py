"""How an app declares its periodic jobs, and how the project finds them.

An app with periodic work keeps a `schedule.py` whose `periodic_jobs()` returns
PeriodicJob values (a function, so a schedule may follow settings). The
`setup_periodic_tasks` command collects them from every installed app, as
Celery's autodiscover finds each app's tasks.py, so the kernel names no app.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field, replace

from django.apps import apps
from django.core.exceptions import ImproperlyConfigured
from django.utils.module_loading import module_has_submodule

SCHEDULE_MODULE = "schedule"


@dataclass(frozen=True)
class PeriodicJob:
    name: str  # the beat entry's name, unique across apps; what staff see in admin
    task: str  # the Celery task's registered name
    why: str  # one line, shown as the entry's description
    crontab: dict[str, str] | None = None  # minute/hour/day_of_week/day_of_month/month_of_year, UTC
    every_seconds: int | None = None
    declared_in: str = field(default="", compare=False)  # filled in by periodic_jobs_discover

    def __post_init__(self) -> None:
        if (self.crontab is None) == (self.every_seconds is None):
            raise ImproperlyConfigured(f"Periodic job {self.name!r}: give a crontab or every_seconds, not both.")


def periodic_jobs_discover() -> list[PeriodicJob]:
    """Every installed app's declared jobs, in INSTALLED_APPS order. Two apps
    declaring one name is a configuration error, not a silent overwrite."""
    jobs: dict[str, PeriodicJob] = {}
    for app_config in apps.get_app_configs():
        if not module_has_submodule(app_config.module, SCHEDULE_MODULE):
            continue
        module = importlib.import_module(f"{app_config.name}.{SCHEDULE_MODULE}")
        declare = getattr(module, "periodic_jobs", None)
        if declare is None:  # some other app's module of that name
            continue
        for job in declare():
            if job.name in jobs:
                raise ImproperlyConfigured(f"Periodic job {job.name!r} is declared in both "
                                           f"{jobs[job.name].declared_in} and {module.__name__}.")
            jobs[job.name] = replace(job, declared_in=module.__name__)
    return list(jobs.values())
