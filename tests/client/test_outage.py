"""A database outage seen through the client: the server answers 503 `service_unavailable` with
`Retry-After` while PostgreSQL is down; the client waits as told and repeats the consume with its
operation id until PostgreSQL is back, and the operation is recorded exactly once."""
from __future__ import annotations

import logging
import threading
import time

import pytest

from consensus_tokens_client import Client, RetryPolicy
from tests.ops.conftest import clone_test_database, run_gunicorn

pytestmark = [pytest.mark.faults, pytest.mark.django_db(transaction=True), pytest.mark.within_one_period]


def test_a_consume_during_a_database_outage_is_recorded_once_it_is_back(postgres_cluster, service_key, make_user,
                                                                        caplog):
    user = make_user("basic")
    database_url = clone_test_database(postgres_cluster)
    patient = RetryPolicy(attempts=40, backoff=0.05, max_backoff=0.5, max_retry_after=5)
    outcome: list = []
    with run_gunicorn(workers=1, threads=4, env={"DATABASE_URL": database_url}) as server, \
            Client(server.url, service_key, retry=patient) as client:
        client.consume(user_id=user.pk, tokens=1, operation_type="summary", operation_id="before")
        postgres_cluster.stop()
        caplog.set_level(logging.INFO, logger="consensus_tokens_client")
        started = time.monotonic()
        worker = threading.Thread(target=lambda: outcome.append(client.consume(
            user_id=user.pk, tokens=13, operation_type="summary", operation_id="during-the-outage")))
        worker.start()
        time.sleep(2.5)
        postgres_cluster.start()
        worker.join(timeout=60)
        elapsed = time.monotonic() - started
        usage = client.usage(user_id=user.pk)

    assert outcome and outcome[0].tokens == 13 and not outcome[0].replayed
    retried = [r.getMessage() for r in caplog.records if "retrying" in r.getMessage()]
    assert retried and all("service_unavailable" in m or "no answer" in m for m in retried), retried
    assert any("service_unavailable" in m for m in retried), "the server's 503s were retried"
    assert elapsed >= 2.5 and usage.used == 14
    rows = postgres_cluster.psql("-d", "ct_fault", "-At", "-c",
                                 "SELECT count(*) FROM metering_ledgerentry WHERE kind = 'consumption' "
                                 "AND operation_id = 'during-the-outage'").stdout.strip()
    assert rows == "1"
