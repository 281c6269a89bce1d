"""schemathesis against /api/schema/: every operation, a few hundred generated requests
(valid and invalid), authenticated with a consume-scope service key, in-process
through the WSGI app on the real test database, with every check: no 500s; every
response — status, headers, content type and body — matches the published schema;
what the schema calls invalid is refused and what it calls valid is accepted, but for
refusals about data the schema cannot state (DATA_REFUSALS).

(schemathesis' own pytest loader does not run under pytest 9, so each operation's
hypothesis strategy is driven here directly; the operations are read from the same
generator that serves /api/schema/, and the test checks the served schema is it.)
"""
from __future__ import annotations

import pytest
import schemathesis
from django.core.signals import request_finished, request_started
from django.core.wsgi import get_wsgi_application
from django.db import close_old_connections
from drf_spectacular.generators import SchemaGenerator
from hypothesis import HealthCheck, Phase, given, settings as hypothesis_settings
from hypothesis import strategies as st
from rest_framework.test import APIClient
from schemathesis.specs.openapi.checks import positive_data_acceptance

from metering.analytics_api import MAX_DAYS

pytestmark = [pytest.mark.fuzz, pytest.mark.django_db, pytest.mark.within_one_period]

# Examples per operation and mode: with the API's operations, a few hundred requests in all.
EXAMPLES = 20

# userIds the generator may swap in for valid requests, so they also reach real accounts and
# not only 404s (never for invalid ones: the swap could mend the very field made invalid).
_known_users: list[int] = []


# Operations whose body or query takes an optional userId at the top (a service key must send it).
_OPTIONAL_USER = {"POST /api/tokens/estimate", "POST /api/tokens/check", "GET /api/tokens/usage",
                  "GET /api/tokens/history", "GET /api/tokens/analytics/daily", "GET /api/tokens/reports/monthly"}


def _with_known_users(values, label: str | None = None):
    """Also offer the value with a known user (and a known operation type and provider)."""
    if not _known_users or not isinstance(values, dict):
        return st.just(values)
    if "userId" not in values and label not in _OPTIONAL_USER:
        return st.just(values)
    known = [{**values, "userId": uid} for uid in _known_users]
    known += [{**k, **{f: v for f, v in (("operationType", "summary"), ("provider", "openai")) if f in values}}
              for k in known]
    return st.sampled_from([values, *known])


@schemathesis.hook
def flatmap_body(ctx, body):
    return _with_known_users(body, ctx.operation.label if ctx.operation else None)


@schemathesis.hook
def flatmap_query(ctx, query):
    return _with_known_users(query, ctx.operation.label if ctx.operation else None)


class InProcessApp:
    """The real WSGI app, except that starting or finishing a request does not close the
    database connection (which holds the test's transaction), as Django's test client does."""

    def __init__(self) -> None:
        self.app = get_wsgi_application()

    def __call__(self, environ, start_response):
        request_started.disconnect(close_old_connections)
        request_finished.disconnect(close_old_connections)
        try:
            response = self.app(environ, start_response)
            try:
                body = b"".join(response)
            finally:
                response.close()
        finally:
            request_started.connect(close_old_connections)
            request_finished.connect(close_old_connections)
        return [body]


def _schema_document() -> dict:
    return SchemaGenerator().get_schema(request=None, public=True)


def _load(document: dict):
    schema = schemathesis.openapi.from_dict(document)
    schema.app = InProcessApp()
    return schema


# Operations whose valid requests reach a 2xx with a known user (a release needs a real hold,
# a batch nests its users one level down, history's free-text from/to/cursor rarely parse).
REACHABLE = {"POST /api/tokens/estimate", "POST /api/tokens/check", "POST /api/tokens/consume",
             "GET /api/tokens/usage", "GET /api/tokens/analytics/daily", "GET /api/tokens/reports/monthly"}

OPERATIONS = sorted(op.ok().label for op in _load(_schema_document()).get_all_operations())


def test_the_schema_is_served_and_lists_the_token_api(api):
    served = api.get("/api/schema/?format=json")
    assert served.status_code == 200
    paths = set(served.json()["paths"])
    assert {"/api/tokens/estimate", "/api/tokens/check", "/api/tokens/consume", "/api/tokens/consume/batch",
            "/api/tokens/release", "/api/tokens/usage", "/api/tokens/history"} <= paths
    assert paths == set(_schema_document()["paths"])
    assert served.json()["components"]["securitySchemes"]["ServiceKey"]["in"] == "header"


# Refusals of schema-valid requests that are about data, not form: operation types and providers are
# rows staff edit (the schema cannot list them), the cap is the account's, and analytics' from/to
# range (from not after to, at most MAX_DAYS) and a batch's items (one operation once) are rules across
# fields; and the reads' userId is
# optional for a signed-in user (themselves) but required of a service key, as these requests are.
DATA_REFUSALS = {(400, "unknown_operation_type"), (400, "unknown_provider"), (402, "token_cap_exceeded"),
                 (400, "duplicate_operation")}
RANGE_MESSAGES = {"Must not be after 'to'.", f"At most {MAX_DAYS} days per request."}


def _refused_for_data(response, case) -> bool:
    try:
        error = response.json()["error"]
    except (ValueError, KeyError, TypeError):
        return False
    if (response.status_code, error.get("code")) in DATA_REFUSALS:
        return True
    fields = error.get("fields") or {}
    if fields == {"userId": ["This field is required."]}:
        return "userId" not in (case.body if isinstance(case.body, dict) else case.query or {})
    return (case.operation.label == "GET /api/tokens/analytics/daily" and response.status_code == 400
            and set(fields) == {"from"} and set(fields["from"]) <= RANGE_MESSAGES)


def positive_data_accepted(ctx, response, case):
    """schemathesis' positive_data_acceptance, except for DATA_REFUSALS."""
    if _refused_for_data(response, case):
        return None
    return positive_data_acceptance(ctx, response, case)


@pytest.mark.parametrize("mode", [schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE],
                         ids=["valid", "invalid"])
@pytest.mark.parametrize("label", OPERATIONS)
def test_every_operation_answers_as_its_schema_says(label, mode, service_key, make_user, settings):
    settings.RATELIMIT_ENABLE = False  # limits are tested on their own; here they would hide the endpoints
    users = [make_user("basic").pk, make_user("enterprise").pk]
    _known_users[:] = users if mode == schemathesis.GenerationMode.POSITIVE else []
    schema = _load(_schema_document())
    operation = next(op.ok() for op in schema.get_all_operations() if op.ok().label == label)
    headers = {"Authorization": f"Api-Key {service_key}"}

    @given(case=operation.as_strategy(generation_mode=mode))
    @hypothesis_settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                         phases=[Phase.explicit, Phase.generate],
                         suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                                HealthCheck.data_too_large])
    def run(case):
        response = case.call_and_validate(headers=headers, excluded_checks=[positive_data_acceptance],
                                          additional_checks=[positive_data_accepted])
        statuses.append(response.status_code)

    statuses: list[int] = []
    run()
    assert 500 not in statuses and len(statuses) >= 5
    if mode == schemathesis.GenerationMode.POSITIVE and label in REACHABLE:
        assert any(200 <= s < 300 for s in statuses), (label, sorted(set(statuses)))


@pytest.mark.parametrize("label,make_case", [
    ("GET /api/tokens/usage", lambda op, uid: op.Case(query={"userId": uid})),
    ("POST /api/tokens/consume", lambda op, uid: op.Case(body={"userId": uid, "operationId": "limited", "tokens": 5,
                                                               "operationType": "summary"})),
])
def test_rate_limited_answers_match_the_schema_too(label, make_case, service_key, make_user):
    from metering.models import Tier

    Tier.objects.filter(slug="basic").update(requests_per_hour=0)
    schema = _load(_schema_document())
    operation = next(op.ok() for op in schema.get_all_operations() if op.ok().label == label)
    case = make_case(operation, make_user("basic").pk)
    response = case.call(headers={"Authorization": f"Api-Key {service_key}"})
    assert response.status_code == 429
    case.validate_response(response, excluded_checks=[positive_data_acceptance])
