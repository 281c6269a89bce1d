"""The client's tests run it against a live server of the project: gunicorn with the
production config file on the test PostgreSQL and Redis (tests/ops/conftest.py's run_gunicorn),
so the tests are transactional (the server sees committed rows only). `proxy` puts a TCP proxy
in front of it that can lose a request or an answer (tests/client/proxy.py)."""
from __future__ import annotations

import pytest

from consensus_tokens_client import Client, RetryPolicy
from tests.ops.conftest import run_gunicorn

from .proxy import Proxy

# Quick retries: the tests wait for what they test, not for production's backoff.
FAST_RETRIES = RetryPolicy(attempts=4, backoff=0.02, max_backoff=0.2, max_retry_after=5)


@pytest.fixture
def server(transactional_db):
    with run_gunicorn(workers=2, threads=4) as live:
        yield live


@pytest.fixture
def proxy(server):
    in_front = Proxy(int(server.url.rsplit(":", 1)[1]))
    yield in_front
    in_front.close()


@pytest.fixture
def client(server, service_key):
    with Client(server.url, service_key, timeout=10, retry=FAST_RETRIES) as live_client:
        yield live_client


# a throwaway PostgreSQL the outage test stops and starts (the shared one is never touched)
from tests.ops.conftest import postgres_cluster  # noqa: E402,F401
