"""Billing tests talk to a fake Stripe over real HTTP (tests/billing/fake_stripe.py),
and Stripe's webhooks reach the app over real HTTP too (pytest-django's live
server), signed with the endpoint's secret."""
from __future__ import annotations

import logging
import time
from typing import Any, Iterator

import pytest
import stripe
from django.core.management import call_command

from .fake_stripe import FakeStripe

logging.getLogger("stripe").setLevel(logging.WARNING)

# Webhook tests run the app in a live server thread, so their data must be committed
# (tests/conftest.py seeds the tiers and operation types again after the flush).
e2e = pytest.mark.django_db(transaction=True)


@pytest.fixture
def fake_stripe() -> Iterator[FakeStripe]:
    fake = FakeStripe().start()
    yield fake
    fake.stop()


@pytest.fixture
def stripe_on(settings: Any, fake_stripe: FakeStripe) -> Iterator[FakeStripe]:
    """The app configured to use the fake Stripe (as STRIPE_SECRET_KEY/STRIPE_API_HOST would)."""
    previous = stripe.api_base
    settings.STRIPE_SECRET_KEY = fake_stripe.secret_key
    settings.STRIPE_TEST_SECRET_KEY = fake_stripe.secret_key
    settings.STRIPE_API_HOST = fake_stripe.url
    stripe.api_base = fake_stripe.url
    yield fake_stripe
    stripe.api_base = previous


@pytest.fixture
def site(settings: Any, live_server: Any, stripe_on: FakeStripe) -> FakeStripe:
    """Stripe configured, the app served by a live server at SITE_URL, and `setup_stripe` run."""
    settings.SITE_URL = live_server.url
    call_command("setup_stripe", stdout=_Sink())
    return stripe_on


class _Sink:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def write(self, text: str) -> None:
        self.lines.append(text)

    def flush(self) -> None:
        pass


def deliver_all(fake: FakeStripe, events: list[dict[str, Any]]) -> None:
    for event in events:
        status, body = fake.deliver(event)
        assert status == 200, (event["type"], status, body[:500])


def checkout(fake: FakeStripe, client: Any, user: Any, tier: str = "pro", interval: str = "month",
             **paid: Any) -> list[dict[str, Any]]:
    """The user buys `tier` through the checkout endpoint and pays; returns the events
    Stripe sends (not delivered yet)."""
    client.force_login(user)
    response = client.post("/billing/checkout", {"tier": tier, "interval": interval})
    assert response.status_code == 303, response.content[:300]
    session_id = response["Location"].rsplit("/", 1)[1]
    # The period began a while ago, so a renewal "now" is a later period.
    paid.setdefault("start", int(time.time()) - 20 * 24 * 3600)
    return fake.checkout_complete(session_id, **paid)


def subscribe(fake: FakeStripe, client: Any, user: Any, tier: str = "pro", interval: str = "month",
              **paid: Any) -> str:
    """`checkout`, with Stripe's webhooks delivered. Returns the subscription id."""
    events = checkout(fake, client, user, tier, interval, **paid)
    deliver_all(fake, events)
    return events[0]["data"]["object"]["id"]


def price_id(fake: FakeStripe, lookup_key: str) -> str:
    return next(p["id"] for p in fake.all("price") if p["lookup_key"] == lookup_key)


def consume(api: Any, user: Any, tokens: int, operation_id: str) -> Any:
    response = api.post("/api/tokens/consume", {"userId": user.pk, "operationId": operation_id, "tokens": tokens,
                                               "operationType": "consensus"}, format="json")
    return response
