import pytest


@pytest.mark.django_db
def test_consume_records_usage_and_replay_answers_the_same(api, make_user):
    user = make_user("basic")
    body = {"userId": user.pk, "operationId": "op-1", "tokens": 250, "operationType": "summary"}
    first = api.post("/api/tokens/consume", body, format="json")
    assert first.status_code == 201, first.content
    assert first.json()["usage"]["used"] == 250
    again = api.post("/api/tokens/consume", body, format="json")
    assert again.status_code == 200
    assert again.json() == first.json()
    usage = api.get(f"/api/tokens/usage?userId={user.pk}").json()
    assert usage["used"] == 250 and usage["tier"] == "basic" and usage["limit"] == 10_000
