"""Helpers for the metering tests: a consume shortcut, a way to put a user near
their cap through the real service, and a runner for real concurrent requests."""
from __future__ import annotations

import threading
from typing import Any, Callable

import pytest
from django.db import connection
from rest_framework.test import APIClient

from metering.models import UsagePeriod
from metering.services import SYSTEM, ConsumeRequest, account_for_user, period_current, usage_consume


# For transactional tests: only these apps' tables are flushed after each test (not
# dj-stripe's sixty), as the flush is most of such a test's time.
FLUSHED_APPS = ["django.contrib.contenttypes", "django.contrib.auth", "django.contrib.sessions", "metering",
                "billing", "alerts"]


def consume_body(user, operation_id: str, tokens: int, operation_type: str = "summary", **extra: Any) -> dict:
    return {"userId": user.pk, "operationId": operation_id, "tokens": tokens, "operationType": operation_type, **extra}


@pytest.fixture
def spend():
    """spend(user, tokens) records a real consumption through the service (not the API)."""
    counter = iter(range(1, 1_000_000))

    def spend(user, tokens: int, operation_type: str = "summary") -> None:
        usage_consume(request=ConsumeRequest(user_id=user.pk, operation_id=f"setup-{next(counter)}", tokens=tokens,
                                             operation_type=operation_type), ctx=SYSTEM)

    return spend


def current_period(user) -> UsagePeriod:
    return period_current(account=account_for_user(user_id=user.pk))


def run_concurrently(count: int, work: Callable[[int], Any]) -> list[Any]:
    """Run work(i) for i in range(count) in `count` real threads released together.
    Each thread uses its own database connection and closes it at the end."""
    barrier = threading.Barrier(count)
    results: list[Any] = [None] * count
    errors: list[BaseException] = []

    def target(i: int) -> None:
        try:
            barrier.wait(timeout=30)
            results[i] = work(i)
        except BaseException as exc:  # reported below, in the test's thread
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=target, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    if errors:
        raise errors[0]
    return results


def key_client(raw_key: str) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Api-Key {raw_key}")
    return client
