"""Under gunicorn with the production config file, an over-long URL gets the app's JSON 414
(consensus_tokens/request_limits.py), not gunicorn's HTML one: gunicorn.conf.py lets request
lines through up to 8190 bytes, past the app's MAX_URL_BYTES."""
from __future__ import annotations

import pytest
import requests

from consensus_tokens.request_limits import MAX_URL_BYTES

from .conftest import run_gunicorn

pytestmark = [pytest.mark.django_db, pytest.mark.within_one_period]  # the gunicorn below connects to the test database


def test_a_5kb_cursor_gets_a_json_414_through_gunicorn():
    with run_gunicorn(workers=1, threads=2) as server:
        response = requests.get(f"{server.url}/api/tokens/history?userId=1&cursor={'c' * 5000}", timeout=10)
        assert response.status_code == 414, response.text[:300]
        assert response.headers["Content-Type"].startswith("application/json")
        assert response.json()["error"]["code"] == "uri_too_long"
        assert str(MAX_URL_BYTES) in response.json()["error"]["message"]
        assert response.headers["X-Request-ID"]  # answered by the app, with its request id
        # a short URL still reaches the app as before
        assert requests.get(f"{server.url}/api/tokens/history?userId=1", timeout=10).status_code in (401, 403)
