"""Shared fixtures. Tests run against real PostgreSQL and Redis (see
consensus_tokens/settings/test.py); nothing of ours is mocked."""
from __future__ import annotations

import itertools
from importlib import import_module

import pytest
from django.core.cache import cache
from rest_framework.test import APIClient

from metering.models import Account, ServiceKey, Tier
from metering.services import service_key_create

_usernames = itertools.count(1)


@pytest.fixture(autouse=True)
def _clear_cache():
    cache.clear()
    yield


def _seed_reference_data() -> None:
    from django.apps import apps

    import_module("metering.migrations.0002_seed_tiers_operations_providers").seed(apps, None)


@pytest.fixture(scope="session")
def django_db_setup(django_db_setup, django_db_blocker):
    """A transactional test ends by flushing every table, the migration-seeded tiers,
    operation types and providers included, and --reuse-db keeps that state: seed again."""
    with django_db_blocker.unblock():
        _seed_reference_data()


@pytest.fixture(autouse=True)
def _reseed_for_transactional_tests(request):
    marker = request.node.get_closest_marker("django_db")
    if (marker and marker.kwargs.get("transaction")) or "transactional_db" in request.fixturenames:
        request.getfixturevalue("transactional_db")
        _seed_reference_data()


@pytest.fixture
def tier(db):
    return Tier.objects.get(slug="basic")


@pytest.fixture
def make_user(db, django_user_model):
    """make_user(tier="pro") -> a user with an account on that tier."""

    def make(tier: str = "basic", **fields):
        username = fields.pop("username", f"user{next(_usernames)}")
        user = django_user_model.objects.create_user(username=username, email=f"{username}@example.com",
                                                     password="pw-for-tests-1", **fields)
        Account.objects.create(user=user, tier=Tier.objects.get(slug=tier) if tier else None)
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
