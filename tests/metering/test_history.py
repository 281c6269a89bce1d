"""GET /api/tokens/history: the user's ledger, newest first, filtered and paged by cursor."""
from __future__ import annotations

from datetime import datetime, timezone as dt_timezone

import pytest
import time_machine

from .conftest import consume_body

pytestmark = pytest.mark.django_db


def at(day: int, hour: int = 12) -> datetime:
    return datetime(2026, 11, day, hour, tzinfo=dt_timezone.utc)


@pytest.fixture
def history_user(api, make_user):
    """Consumptions on Nov 3, 5 (x2: summary, analysis), 7, plus a reservation and its release on Nov 7."""
    user = make_user("pro")
    for day, op, kind in [(3, "c-3", "summary"), (5, "c-5a", "summary"), (5, "c-5b", "analysis"),
                          (7, "c-7", "consensus")]:
        with time_machine.travel(at(day), tick=False):
            response = api.post("/api/tokens/consume", consume_body(user, op, day * 10, kind), format="json")
            assert response.status_code == 201
    with time_machine.travel(at(7, 13), tick=False):
        hold = api.post("/api/tokens/check", {"userId": user.pk, "tokens": 99, "reserve": True,
                                              "operationId": "h", "operationType": "summary"}, format="json").json()
        api.post("/api/tokens/release", {"userId": user.pk, "reservationId": hold["reservationId"]}, format="json")
    return user


def history(api, user, query: str = "") -> dict:
    response = api.get(f"/api/tokens/history?userId={user.pk}{query}")
    assert response.status_code == 200, response.content
    return response.json()


def test_history_is_the_ledger_newest_first(api, history_user):
    rows = history(api, history_user)["results"]
    assert [(r["kind"], r["operationId"]) for r in rows] == [
        ("release", "h"), ("reservation", "h"), ("consumption", "c-7"), ("consumption", "c-5b"),
        ("consumption", "c-5a"), ("consumption", "c-3")]
    c7 = rows[2]
    assert (c7["tokens"], c7["reservedDelta"], c7["operationType"], c7["actualTokens"]) == (70, 0, "consensus", 70)
    assert c7["createdAt"].startswith("2026-11-07T12:00:00")
    assert (rows[0]["tokens"], rows[0]["reservedDelta"]) == (0, -99)


@pytest.mark.parametrize("query,expected", [
    ("&from=2026-11-05", ["h", "h", "c-7", "c-5b", "c-5a"]),
    ("&to=2026-11-05", ["c-5b", "c-5a", "c-3"]),  # a date includes that whole day
    ("&from=2026-11-04&to=2026-11-06", ["c-5b", "c-5a"]),
    ("&from=2026-11-07T12:30:00Z", ["h", "h"]),
    ("&to=2026-11-05T12:00:00Z", ["c-5b", "c-5a", "c-3"]),
    ("&operationType=summary", ["h", "h", "c-5a", "c-3"]),
    ("&operationType=summary&kind=consumption", ["c-5a", "c-3"]),
    ("&kind=release", ["h"]),
    ("&from=2026-12-01", []),
])
def test_history_filters(api, history_user, query, expected):
    assert [r["operationId"] for r in history(api, history_user, query)["results"]] == expected


def test_history_pages_with_a_cursor_without_gaps_or_repeats(api, history_user):
    seen, query, pages = [], "&pageSize=4", 0
    while True:
        page = history(api, history_user, query)
        seen += [r["id"] for r in page["results"]]
        pages += 1
        if not page["next"]:
            break
        query = "&" + page["next"].split("?", 1)[1]
    assert pages == 2
    assert len(seen) == len(set(seen)) == 6
    assert seen == sorted(seen, reverse=True)


def test_history_shows_only_that_user(api, history_user, make_user):
    other = make_user()
    api.post("/api/tokens/consume", consume_body(other, "theirs", 5), format="json")
    assert "theirs" not in [r["operationId"] for r in history(api, history_user)["results"]]
    assert [r["operationId"] for r in history(api, other)["results"]] == ["theirs"]
