"""The request limits answer in the API's error shape (consensus_tokens/request_limits.py):
a body past DATA_UPLOAD_MAX_MEMORY_SIZE 413 `payload_too_large` (it was Django's HTML
"Bad Request (400)"), a URL past MAX_URL_BYTES 414 `uri_too_long`."""
from __future__ import annotations

import pytest
from django.conf import settings
from django.core.exceptions import RequestDataTooBig

from consensus_tokens.errors import exception_handler
from consensus_tokens.request_limits import MAX_URL_BYTES

pytestmark = pytest.mark.django_db


def _error(response, status: int, code: str) -> dict:
    assert response.status_code == status, response.content[:300]
    assert response["Content-Type"].startswith("application/json")
    error = response.json()["error"]
    assert error["code"] == code and error["message"]
    return error


@pytest.mark.parametrize("path", ["/api/tokens/consume", "/api/tokens/consume/batch", "/api/tokens/check"])
def test_a_body_past_the_upload_limit_is_a_json_413(api, make_user, path):
    body = b'{"userId": %d, "operationId": "big", "tokens": 5, "operationType": "summary", "model": "%s"}' % (
        make_user().pk, b"x" * (10 * 1024 * 1024))
    error = _error(api.post(path, data=body, content_type="application/json"), 413, "payload_too_large")
    assert str(settings.DATA_UPLOAD_MAX_MEMORY_SIZE) in error["message"]


def test_a_body_at_the_limit_is_read_as_usual(api, make_user):
    head = b'{"userId": %d, "operationId": "at-limit", "tokens": 5, "operationType": "summary", "x": "' % (
        make_user().pk)
    body = head + b"x" * (settings.DATA_UPLOAD_MAX_MEMORY_SIZE - len(head) - 2) + b'"}'
    assert len(body) == settings.DATA_UPLOAD_MAX_MEMORY_SIZE
    assert api.post("/api/tokens/consume", data=body, content_type="application/json").status_code == 201


def test_a_body_too_big_read_without_a_content_length_is_a_413_too():
    """A chunked body has no Content-Length for the middleware to see; Django raises where it is read."""
    response = exception_handler(RequestDataTooBig("too big"), {})
    assert response.status_code == 413 and response.data["error"]["code"] == "payload_too_large"


@pytest.mark.parametrize("path", ["/api/tokens/history", "/api/tokens/usage", "/health/live"])
def test_a_url_past_the_limit_is_a_json_414(api, make_user, path):
    cursor = "c" * 5000  # the attack's 5 kB cursor
    error = _error(api.get(f"{path}?userId={make_user().pk}&cursor={cursor}"), 414, "uri_too_long")
    assert str(MAX_URL_BYTES) in error["message"]


def test_a_url_at_the_limit_is_answered_as_usual(api, make_user):
    start = f"/api/tokens/history?userId={make_user().pk}&operationType=summary&x="
    url = start + "x" * (MAX_URL_BYTES - len(start))
    assert len(url) == MAX_URL_BYTES
    assert api.get(url).status_code == 200


def test_too_many_query_fields_is_a_json_400(api, make_user):
    """Past DATA_UPLOAD_MAX_NUMBER_FIELDS Django raises TooManyFieldsSent (its HTML 400 otherwise)."""
    fields = "&".join(["f"] * (settings.DATA_UPLOAD_MAX_NUMBER_FIELDS + 1))
    assert len(fields) < MAX_URL_BYTES - 40
    _error(api.get(f"/api/tokens/usage?userId={make_user().pk}&{fields}"), 400, "invalid_request")
