"""The OpenAPI schema at /api/schema/ lists every metering endpoint as served."""
from __future__ import annotations

import io
import re

import pytest
from django.core.management import call_command
from django.urls import resolve
from rest_framework.test import APIClient

from metering import urls as metering_urls

pytestmark = pytest.mark.django_db

ENDPOINTS = {
    "/api/tokens/estimate": "post",
    "/api/tokens/check": "post",
    "/api/tokens/consume": "post",
    "/api/tokens/consume/batch": "post",
    "/api/tokens/release": "post",
    "/api/tokens/usage": "get",
    "/api/tokens/history": "get",
}


@pytest.fixture
def schema() -> dict:
    response = APIClient().get("/api/schema/", {"format": "json"})
    assert response.status_code == 200, response.content[:300]
    return response.json()


def test_schema_lists_every_endpoint_with_its_method(schema):
    assert schema["openapi"].startswith("3.")
    for path, method in ENDPOINTS.items():
        assert path in schema["paths"], path
        assert set(schema["paths"][path]) - {"parameters"} == {method}, schema["paths"][path].keys()


def test_every_metering_url_is_in_the_schema(schema):
    metering = [p for p in schema["paths"] if p.startswith("/api/tokens/")]
    served = {"/api/tokens/" + str(pattern.pattern) for pattern in metering_urls.urlpatterns}
    assert all(resolve(path) for path in served)
    assert set(metering) == served >= set(ENDPOINTS)


def test_schema_documents_bodies_parameters_and_errors(schema):
    consume = schema["paths"]["/api/tokens/consume"]["post"]
    assert {"200", "201", "400", "401", "402", "409"} <= set(consume["responses"])
    body_ref = consume["requestBody"]["content"]["application/json"]["schema"]["$ref"].rsplit("/", 1)[-1]
    body = schema["components"]["schemas"][body_ref]
    assert {"userId", "operationId", "tokens", "operationType"} <= set(body["required"])
    assert {"provider", "model", "reservationId", "estimatedTokens"} <= set(body["properties"])
    assert body["properties"]["tokens"]["maximum"] == 1_000_000 and body["properties"]["tokens"]["minimum"] == 1
    history = schema["paths"]["/api/tokens/history"]["get"]
    assert {"userId", "from", "to", "operationType", "cursor"} <= {p["name"] for p in history["parameters"]}
    usage = schema["paths"]["/api/tokens/usage"]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
    usage_props = schema["components"]["schemas"][usage["$ref"].rsplit("/", 1)[-1]]["properties"]
    assert {"tier", "limit", "used", "reserved", "remaining", "usagePercentage", "status", "cap", "overage",
            "periodStart", "periodEnd"} <= set(usage_props)


def test_batch_items_document_settling_a_reservation(schema):
    def component(ref: str) -> dict:
        return schema["components"]["schemas"][ref.rsplit("/", 1)[-1]]

    batch = schema["paths"]["/api/tokens/consume/batch"]["post"]
    assert {"201", "400", "402", "404", "409"} <= set(batch["responses"])
    body = component(batch["requestBody"]["content"]["application/json"]["schema"]["$ref"])
    item = component(body["properties"]["operations"]["items"]["$ref"])
    reservation = item["properties"]["reservationId"]
    assert reservation["format"] == "uuid" and reservation.get("nullable") is True
    assert "within the room left under the cap" in reservation["description"]
    assert "reservationId" not in item.get("required", [])


def test_the_metering_schema_generates_without_warnings():
    out, err = io.StringIO(), io.StringIO()
    call_command("spectacular", "--validate", "--fail-on-warn", "--urlconf", "tests.metering.schema_urls",
                 stdout=out, stderr=err)
    assert "/api/tokens/consume/batch" in out.getvalue()


def _component(schema: dict, ref: str) -> dict:
    return schema["components"]["schemas"][ref.rsplit("/", 1)[-1]]


def _body(schema: dict, path: str) -> dict:
    return _component(schema, schema["paths"][path]["post"]["requestBody"]["content"]["application/json"]
                      ["schema"]["$ref"])["properties"]


def _query(schema: dict, path: str) -> dict:
    return {p["name"]: p["schema"] for p in schema["paths"][path]["get"]["parameters"]}


@pytest.mark.parametrize("path", ["/api/tokens/usage", "/api/tokens/history", "/api/tokens/analytics/daily",
                                  "/api/tokens/reports/monthly"])
def test_the_reads_userid_has_the_minimum_validation_has(schema, path):
    """userId=0 was schema-valid, and refused."""
    assert _query(schema, path)["userId"]["minimum"] == 1


def test_non_blank_strings_say_so(schema):
    """A blank operationType/operationId was schema-valid, and refused (trimmed, then empty)."""
    consume = _body(schema, "/api/tokens/consume")
    for name in ("operationType", "operationId"):
        field = consume[name]
        assert field["type"] == "string" and field["minLength"] == 1
        assert not re.search(field["pattern"], "   ") and not re.search(field["pattern"], "\t")
        assert not re.search(field["pattern"], "a\u0000b") and re.search(field["pattern"], " op-1")
    history = _query(schema, "/api/tokens/history")
    assert history["operationType"]["minLength"] == 1
    for name in ("from", "to"):  # an empty from= was schema-valid (any string), and refused
        assert {s["format"] for s in history[name]["anyOf"]} == {"date", "date-time"}


def test_the_month_and_the_analytics_dates_have_their_ranges(schema):
    month = _query(schema, "/api/tokens/reports/monthly")["month"]["pattern"]
    assert all(re.search(month, m) for m in ("0001-01", "2026-12", "9999-12"))
    assert not any(re.search(month, m) for m in ("0000-01", "2026-13", "2026-1", "10000-01"))
    day = _query(schema, "/api/tokens/analytics/daily")["from"]
    assert day["format"] == "date" and re.search(day["pattern"], "1970-01-01") and re.search(day["pattern"], "9998-12-31")
    assert not re.search(day["pattern"], "1969-12-31") and not re.search(day["pattern"], "9999-01-01")


def test_batches_are_not_empty_and_booleans_are_booleans(schema):
    assert _body(schema, "/api/tokens/consume/batch")["operations"]["minItems"] == 1
    assert _body(schema, "/api/tokens/check")["reserve"]["type"] == "boolean"
