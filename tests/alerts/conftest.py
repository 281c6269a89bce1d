"""Helpers for the alerts tests: consume through the real API, read the outbox."""
from __future__ import annotations

import itertools
import re

import pytest
from django.core import mail

_ops = itertools.count(1)


@pytest.fixture
def consume(api):
    """consume(user, tokens, op_type="summary") -> the API's JSON (asserts 201)."""

    def do(user, tokens: int, operation_type: str = "summary", expect: int = 201):
        body = {"userId": user.pk, "operationId": f"alerts-op-{next(_ops)}", "tokens": tokens,
                "operationType": operation_type}
        response = api.post("/api/tokens/consume", body, format="json")
        assert response.status_code == expect, response.content
        return response.json()

    return do


@pytest.fixture
def on_commit(django_capture_on_commit_callbacks):
    """Run on_commit callbacks (the eager send task) as a real commit would."""

    def run(func, *args, **kwargs):
        with django_capture_on_commit_callbacks(execute=True):
            return func(*args, **kwargs)

    return run


def html_of(message) -> str:
    return next(content for content, mime in message.alternatives if mime == "text/html")


def link(text: str, pattern: str) -> str:
    match = re.search(pattern, text)
    assert match, f"no link matching {pattern!r} in:\n{text}"
    return match.group(0)


def outbox_for(address: str) -> list:
    return [m for m in mail.outbox if address in m.to]
