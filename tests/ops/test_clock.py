"""The suite's movable clock (tests/clock.py): a test and the Python processes it starts agree on
the moved time, so a run with CT_TEST_CLOCK proves nothing depends on today's date."""
from __future__ import annotations

import os
import subprocess
import sys
from datetime import datetime, timedelta, timezone

import pytest
import time_machine
from django.utils import timezone as django_timezone

from tests import clock

LAST_SECOND_OF_A_YEAR = datetime(2031, 12, 31, 23, 59, 59, tzinfo=timezone.utc)


def _subprocess_now() -> datetime:
    env = {**os.environ}
    env["PYTHONPATH"] = os.pathsep.join([str(clock.SITE_DIR), env.get("PYTHONPATH", "")])
    out = subprocess.run([sys.executable, "-c", "import time; print(time.time())"], env=env, capture_output=True,
                         text=True, timeout=60, check=True)
    return datetime.fromtimestamp(float(out.stdout), tz=timezone.utc)


def test_a_test_and_its_subprocesses_share_the_moved_clock():
    shift_before = os.environ.get(clock.SHIFT_VARIABLE)  # set when the whole run's clock is moved
    with clock.clock_at(LAST_SECOND_OF_A_YEAR):
        assert abs(django_timezone.now() - LAST_SECOND_OF_A_YEAR) < timedelta(seconds=5)
        assert abs(_subprocess_now() - LAST_SECOND_OF_A_YEAR) < timedelta(seconds=10)
        with time_machine.travel(datetime(2026, 11, 10, tzinfo=timezone.utc), tick=False):  # tests still freeze
            assert django_timezone.now() == datetime(2026, 11, 10, tzinfo=timezone.utc)
        assert abs(django_timezone.now() - LAST_SECOND_OF_A_YEAR) < timedelta(seconds=5)  # and come back
    assert os.environ.get(clock.SHIFT_VARIABLE) == shift_before


def test_the_clock_is_named_in_iso_8601_with_a_zone(monkeypatch):
    monkeypatch.setenv("CT_TEST_CLOCK", "2028-02-29T23:59:30Z")
    assert clock.moved_clock() == datetime(2028, 2, 29, 23, 59, 30, tzinfo=timezone.utc)
    monkeypatch.setenv("CT_TEST_CLOCK", "2028-02-29T23:59:30")
    with pytest.raises(ValueError, match="needs a time zone"):
        clock.moved_clock()
    monkeypatch.setenv("CT_TEST_CLOCK", "")
    assert clock.moved_clock() is None


@pytest.mark.parametrize("when, starts", [
    (datetime(2027, 12, 31, 23, 59, 59, tzinfo=timezone.utc), datetime(2028, 1, 1, 0, 10, tzinfo=timezone.utc)),
    (datetime(2028, 2, 29, 23, 59, 30, tzinfo=timezone.utc), datetime(2028, 3, 1, 0, 10, tzinfo=timezone.utc)),
    (datetime(2027, 1, 31, 23, 50, 1, tzinfo=timezone.utc), datetime(2027, 2, 1, 0, 10, tzinfo=timezone.utc)),
    (datetime(2027, 1, 31, 23, 50, 0, tzinfo=timezone.utc), datetime(2027, 1, 31, 23, 50, 0, tzinfo=timezone.utc)),
    (datetime(2027, 6, 15, tzinfo=timezone.utc), datetime(2027, 6, 15, tzinfo=timezone.utc)),
])
def test_a_test_within_one_period_starts_clear_of_the_month_end(when, starts):
    assert clock.clear_of_month_end(when) == starts


@pytest.mark.within_one_period
def test_the_marker_moves_a_test_off_the_last_minutes_of_a_month():
    """Meaningful in CI's runs at 23:59:30 and 23:59:59 of a month's last day."""
    now = django_timezone.now()
    next_month = (now.replace(day=1, hour=0, minute=0, second=0, microsecond=0) + timedelta(days=32)).replace(day=1)
    assert next_month - now > clock.PERIOD_MARGIN - timedelta(minutes=1)
