"""Shared fixtures. Tests run against real PostgreSQL and Redis (see
consensus_tokens/settings/test.py); nothing of ours is mocked."""
from __future__ import annotations

import itertools
from datetime import datetime, timezone
from importlib import import_module

import pytest
from django.core.cache import cache
from django.db import connections
from rest_framework.test import APIClient

from metering.models import Account, ServiceKey, Tier
from metering.services import service_key_create
from tests import clock

_usernames = itertools.count(1)
_moved_clock = clock.moved_clock()


def pytest_report_header(config):
    if _moved_clock:
        return f"clock: every test starts at {_moved_clock.isoformat()} (CT_TEST_CLOCK)"


def pytest_configure(config):
    if _moved_clock:
        clock.expose_to_subprocesses()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_protocol(item, nextitem):
    """With CT_TEST_CLOCK set, each test (its fixtures' setup and teardown included) runs on
    the moved clock. A test marked `within_one_period` starts clear of a month's end, on the
    moved clock or the real one."""
    start = _moved_clock
    if item.get_closest_marker("within_one_period"):
        now = start or datetime.now(timezone.utc)
        cleared = clock.clear_of_month_end(now)
        if cleared != now:
            start = cleared
    if start is None:
        return (yield)
    with clock.clock_at(start):
        return (yield)


@pytest.fixture(autouse=True)
def _clear_cache():
    from metering.services.estimates import rules_cache_clear

    cache.clear()
    rules_cache_clear()  # per-process rules may hold rows a previous test rolled back
    # Celery keeps "inside a task" in one process-wide flag that each eager task sets and then
    # puts back as it found it: eager tasks run by racing threads (the 64-thread tests) can put
    # back each other's True and leave it set, after which any .get() refuses to block.
    from celery._state import _set_task_join_will_block

    _set_task_join_will_block(False)
    yield


def _seed_reference_data() -> None:
    from django.apps import apps

    import_module("metering.migrations.0002_seed_tiers_operations_providers").seed(apps, None)
    import_module("metering.migrations.0011_seed_mistral_exact").seed(apps, None)


@pytest.fixture(scope="session")
def django_db_setup(django_db_setup, django_db_blocker):
    """A transactional test ends by flushing every table, the migration-seeded tiers,
    operation types and providers included, and --reuse-db keeps that state: seed again."""
    with django_db_blocker.unblock():
        _seed_reference_data()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item, nextitem):
    """After a transactional test's flush, put back what migrations made, so the tests that
    follow (and the next --reuse-db run) find the seed's tiers, operation types and providers."""
    result = yield
    marker = item.get_closest_marker("django_db")
    if nextitem is None:
        # The last test: the session's fixtures, the test database included, are already torn
        # down and the connection points at DATABASE_URL's own database again; the next run's
        # django_db_setup seeds anyway.
        return result
    if (marker and marker.kwargs.get("transaction")) or "transactional_db" in getattr(item, "fixturenames", ()):
        from pytest_django.plugin import blocking_manager_key

        with item.config.stash[blocking_manager_key].unblock():
            try:
                _seed_reference_data()
                if marker and marker.kwargs.get("available_apps"):
                    # a flush limited to some apps skips post_migrate: content types and permissions are gone
                    from django.core.management.sql import emit_post_migrate_signal

                    emit_post_migrate_signal(verbosity=0, interactive=False, db="default")
            finally:
                # This runs outside any test, sometimes in another context than the tests' own
                # (Playwright's greenlets keep their own context-local connections): close what it
                # opened, or the connection outlives the session and blocks dropping the test database.
                connections.close_all()
    return result


@pytest.fixture
def tier(db):
    return Tier.objects.get(slug="basic")


@pytest.fixture
def make_user(db, django_user_model):
    """make_user(tier="pro") -> a user with an account on that tier, able to pay (as a subscriber
    is: overage room per the tier); make_user(can_pay=False) is one without a way to pay."""

    def make(tier: str = "basic", can_pay: bool = True, **fields):
        username = fields.pop("username", f"user{next(_usernames)}")
        user = django_user_model.objects.create_user(username=username, email=f"{username}@example.com",
                                                     password="pw-for-tests-1", **fields)
        Account.objects.create(user=user, tier=Tier.objects.get(slug=tier) if tier else None, can_pay=can_pay)
        return user

    return make


@pytest.fixture
def service_key(db):
    key, raw = service_key_create(name="tests", scope=ServiceKey.Scope.CONSUME)
    return raw


@pytest.fixture
def api(service_key):
    """An API client authenticated as a backend service with the consume scope."""
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Api-Key {service_key}")
    return client


@pytest.fixture
def read_api(db):
    key, raw = service_key_create(name="reader", scope=ServiceKey.Scope.READ)
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Api-Key {raw}")
    return client
