"""GET /api/tokens/analytics/daily and /api/tokens/reports/monthly."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone as dt_timezone

import pytest
from django.test import Client
from django.utils import timezone

from metering.services import ledger_rollup_refresh

from .conftest import write_history


def _day(offset: int) -> str:
    return (timezone.now().date() + timedelta(days=offset)).isoformat()


@pytest.mark.django_db
def test_daily_sums_rolled_up_and_live_rows(read_api, make_user, consume):
    user = make_user("pro")
    write_history(user, days=5, per_day=2, tokens=10)
    ledger_rollup_refresh()
    consume(user, 300, "analysis")  # past the watermark: counted live
    consume(user, 200, "summary")
    body = read_api.get(f"/api/tokens/analytics/daily?userId={user.pk}&from={_day(-5)}&to={_day(0)}").json()
    assert body[-1] == {"date": _day(0), "totalTokens": 500, "requestCount": 2}
    assert [d["date"] for d in body] == [_day(i) for i in range(-5, 1)]
    assert all(d == {"date": d["date"], "totalTokens": 20, "requestCount": 2} for d in body[:-1])
    grouped = read_api.get(f"/api/tokens/analytics/daily?userId={user.pk}&from={_day(0)}&to={_day(0)}"
                           "&groupBy=operationType").json()
    assert grouped == [{"date": _day(0), "operationType": "analysis", "totalTokens": 300, "requestCount": 1},
                       {"date": _day(0), "operationType": "summary", "totalTokens": 200, "requestCount": 1}]


@pytest.mark.django_db
def test_daily_defaults_to_the_last_30_days_and_counts_consumption_only(read_api, make_user, consume):
    user = make_user()
    write_history(user, days=40, tokens=7)
    consume(user, 50)
    from metering.services import usage_grant
    usage_grant(account=user.token_account, tokens=1000, reason="bonus", actor="support")
    body = read_api.get(f"/api/tokens/analytics/daily?userId={user.pk}").json()
    assert len(body) == 30 and body[0]["date"] == _day(-29)
    assert body[-1]["totalTokens"] == 50


@pytest.mark.django_db
def test_monthly_report(read_api, make_user, consume):
    user = make_user("pro")
    consume(user, 300, "analysis")
    consume(user, 100, "analysis")
    consume(user, 201, "summary")
    ledger_rollup_refresh()
    consume(user, 1, "summary")
    month = timezone.now().strftime("%Y-%m")
    body = read_api.get(f"/api/tokens/reports/monthly?userId={user.pk}&month={month}").json()
    assert body == {"month": month, "totalTokens": 602, "totalRequests": 4, "avgTokensPerRequest": 150.5,
                    "operations": [{"operationType": "analysis", "tokens": 400, "requests": 2},
                                   {"operationType": "summary", "tokens": 202, "requests": 2}]}
    empty = read_api.get(f"/api/tokens/reports/monthly?userId={user.pk}&month=2001-02").json()
    assert empty == {"month": "2001-02", "totalTokens": 0, "totalRequests": 0, "avgTokensPerRequest": 0.0,
                     "operations": []}


@pytest.mark.django_db
def test_month_boundaries_are_utc_calendar_months(read_api, make_user):
    user = make_user()
    write_history(user, days=3, end=datetime(2026, 3, 2, tzinfo=dt_timezone.utc), tokens=5)  # Feb 27, 28, Mar 1
    assert read_api.get(f"/api/tokens/reports/monthly?userId={user.pk}&month=2026-02").json()["totalTokens"] == 10
    assert read_api.get(f"/api/tokens/reports/monthly?userId={user.pk}&month=2026-03").json()["totalTokens"] == 5


@pytest.mark.django_db
@pytest.mark.parametrize("query,field", [
    ("from=2026-13-01", "from"), ("to=yesterday", "to"), ("from=2026-02-10&to=2026-02-01", "from"),
    ("from=2000-01-01&to=2026-01-01", "from"), ("groupBy=provider", "groupBy"), ("userId=abc", "userId"),
    ("from=2026-02-01%00", "from"),
])
def test_daily_bad_input_is_a_400_with_the_error_shape(read_api, make_user, query, field):
    user = make_user()
    url = f"/api/tokens/analytics/daily?{'' if 'userId' in query else f'userId={user.pk}&'}{query}"
    response = read_api.get(url)
    assert response.status_code == 400, response.content
    assert response.json()["error"]["code"] == "invalid_request"
    assert field in response.json()["error"]["fields"]


@pytest.mark.django_db
@pytest.mark.parametrize("month", ["2026-13", "2026-1", "26-01", "2026-01-01", "%00"])
def test_monthly_bad_month_is_a_400(read_api, make_user, month):
    user = make_user()
    response = read_api.get(f"/api/tokens/reports/monthly?userId={user.pk}&month={month}")
    assert response.status_code == 400
    assert response.json()["error"]["fields"]["month"]


@pytest.mark.django_db
def test_unknown_user_is_404_and_users_see_only_themselves(read_api, make_user):
    assert read_api.get("/api/tokens/analytics/daily?userId=999999").status_code == 404
    assert read_api.get("/api/tokens/reports/monthly?userId=999999").json()["error"]["code"] == "unknown_user"
    alice, bob = make_user(), make_user()
    client = Client()
    client.force_login(alice)
    assert client.get("/api/tokens/analytics/daily").status_code == 200
    assert client.get(f"/api/tokens/reports/monthly?userId={alice.pk}").status_code == 200
    assert client.get(f"/api/tokens/analytics/daily?userId={bob.pk}").status_code == 403
    assert Client().get("/api/tokens/analytics/daily").status_code in (401, 403)


@pytest.mark.django_db
def test_history_up_to_the_last_day_there_is_answers(read_api, make_user, consume):
    """The shared selector behind /history: `to=9999-12-31` used to overflow (500)."""
    user = make_user()
    consume(user, 5)
    response = read_api.get(f"/api/tokens/history?userId={user.pk}&to=9999-12-31")
    assert response.status_code == 200 and len(response.json()["results"]) == 1


@pytest.mark.django_db
@pytest.mark.parametrize("month", ["0001-01", "0999-05", "9999-12"])
def test_monthly_report_at_the_edge_years_answers_zero_padded(read_api, make_user, month):
    """0001-01 used to answer "1-01", and 9999-12 a 500 (its month end overflowed)."""
    user = make_user()
    response = read_api.get(f"/api/tokens/reports/monthly?userId={user.pk}&month={month}")
    assert response.status_code == 200, response.content
    assert response.json()["month"] == month and response.json()["totalTokens"] == 0


@pytest.mark.django_db
def test_monthly_report_names_this_month_zero_padded(read_api, make_user):
    user = make_user()
    body = read_api.get(f"/api/tokens/reports/monthly?userId={user.pk}").json()
    assert body["month"] == f"{timezone.now().year:04d}-{timezone.now().month:02d}"


@pytest.mark.django_db
@pytest.mark.parametrize("month", ["0000-01", "0000-12", "10000-01"])
def test_a_month_python_and_postgresql_cannot_hold_is_a_400_naming_the_field(read_api, make_user, month):
    """month=0000-01 used to answer 500 (year 0 is out of range)."""
    error = _refused(read_api.get(f"/api/tokens/reports/monthly?userId={make_user().pk}&month={month}"), "month")
    assert "0001-01 to 9999-12" in error["fields"]["month"][0]


@pytest.mark.django_db
@pytest.mark.parametrize("query", ["from=0000-01-01", "to=0000-12-31", "from=0001-01-01", "to=9999-12-31",
                                   "from=9999-12-31", "to=10000-01-01"])
def test_daily_edge_years_are_a_400_not_a_500(read_api, make_user, query):
    _refused(read_api.get(f"/api/tokens/analytics/daily?userId={make_user().pk}&{query}"), query.split("=")[0])


@pytest.mark.django_db
@pytest.mark.parametrize("query,status", [
    ("from=0000-01-01", 400), ("to=0000-12-31", 400), ("from=10000-01-01", 400),
    ("from=0001-01-01", 200), ("to=0001-01-01", 200), ("from=9999-12-31", 200), ("to=9999-12-31", 200),
    ("from=0001-01-01T00:00:00Z", 200), ("to=9999-12-31T23:59:59.999999Z", 200),
    # a time zone that takes the instant past Python's years in UTC: PostgreSQL still compares it
    ("from=0001-01-01T00:00:00%2B05:00", 200), ("to=9999-12-31T23:00:00-05:00", 200),
])
def test_history_edge_years_are_answered_not_a_500(read_api, make_user, query, status):
    user = make_user()
    response = read_api.get(f"/api/tokens/history?userId={user.pk}&{query}")
    assert response.status_code == status, response.content
    if status == 400:
        _refused(response, query.split("=")[0])


def _refused(response, field: str) -> dict:
    """A 400 invalid_request naming `field`; the error body."""
    assert response.status_code == 400, response.content
    error = response.json()["error"]
    assert error["code"] == "invalid_request" and field in error["fields"], error
    return error
