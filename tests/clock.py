"""The suite's clock, movable: `CT_TEST_CLOCK=2028-02-29T23:59:30Z` runs every test as if it
started at that instant (the clock ticks on from there), so no test can depend on today's date.

Each test starts at the instant anew, fixtures of wider scope created during its setup too.
Python processes a test starts (gunicorn, a Celery worker, manage.py) read the same shift from
CT_TEST_CLOCK_SHIFT through tests/clock_site/sitecustomize.py, so they agree with the test to
the millisecond. Servers that are not Python (PostgreSQL, Redis, Chromium) keep the real time;
nothing of ours asks them for the time of day.
"""
from __future__ import annotations

import os
import time
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Iterator

import time_machine
from time_machine import escape_hatch

SITE_DIR = Path(__file__).resolve().parent / "clock_site"
SHIFT_VARIABLE = "CT_TEST_CLOCK_SHIFT"


def moved_clock() -> datetime | None:
    """The instant CT_TEST_CLOCK names (ISO 8601 with a zone, `Z` allowed), or None."""
    raw = os.environ.get("CT_TEST_CLOCK", "").strip()
    if not raw:
        return None
    try:
        when = datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"CT_TEST_CLOCK={raw!r} is not an ISO 8601 date and time") from None
    if when.tzinfo is None:
        raise ValueError(f"CT_TEST_CLOCK={raw!r} needs a time zone (e.g. 2027-06-15T00:00:00Z)")
    return when.astimezone(timezone.utc)


# A test marked `within_one_period` (long races, live servers, browsers: tests about something
# else than period boundaries) starts at least this long before a month ends.
PERIOD_MARGIN = timedelta(minutes=10)


def clear_of_month_end(when: datetime) -> datetime:
    """`when`, or shortly after the next month's start when `when` is less than PERIOD_MARGIN
    before it, so a test that starts then ends in the period it started in."""
    next_month = (when.replace(day=1, hour=0, minute=0, second=0, microsecond=0) + timedelta(days=32)).replace(day=1)
    return next_month + PERIOD_MARGIN if next_month - when < PERIOD_MARGIN else when


def expose_to_subprocesses() -> None:
    """Python processes started from here import tests/clock_site/sitecustomize.py first."""
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if str(SITE_DIR) not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join([str(SITE_DIR), *paths])


@contextmanager
def clock_at(when: datetime) -> Iterator[None]:
    """Run the block as if it started at `when`, this process and the ones it starts."""
    real_now = escape_hatch.time.time() if escape_hatch.is_travelling() else time.time()
    before = os.environ.get(SHIFT_VARIABLE)
    os.environ[SHIFT_VARIABLE] = repr(when.timestamp() - real_now)
    try:
        with time_machine.travel(when, tick=True):
            yield
    finally:
        if before is None:
            os.environ.pop(SHIFT_VARIABLE, None)
        else:
            os.environ[SHIFT_VARIABLE] = before
