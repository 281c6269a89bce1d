"""A Stripe key never reaches the logs or an answer: Stripe's 401 quotes the key it was
given ("Invalid API Key provided: sk_test_****wxyz"), and what we log and raise is redacted.
The log is read where it is written: the root console handler settings.LOGGING configures."""
from __future__ import annotations

import io
import logging
from typing import Any, Iterator

import pytest

from billing import stripe_client
from consensus_tokens.logging import SecretRedactingFilter

from .fake_stripe import FakeStripe


@pytest.fixture
def written_log() -> Iterator[io.StringIO]:
    """What the configured console handler writes while the test runs."""
    [handler] = [h for h in logging.getLogger().handlers
                 if any(isinstance(f, SecretRedactingFilter) for f in h.filters)]
    assert isinstance(handler, logging.StreamHandler)
    out = io.StringIO()
    previous = handler.setStream(out)
    try:
        yield out
    finally:
        handler.setStream(previous)


@pytest.mark.parametrize("key", ["sk_test_WrongButWellFormedKeyWxyz", "sk_live_Looks_Live_But_Wrong_Q7f2"])
def test_a_stripe_401_logs_and_answers_without_the_key(settings: Any, stripe_on: FakeStripe, written_log, key):
    settings.STRIPE_SECRET_KEY = key  # not the fake's: it answers 401 and quotes the key, masked
    with pytest.raises(stripe_client.StripeError) as refused:
        stripe_client.product_retrieve("prod_anything")
    log = written_log.getvalue()
    assert "stripe product retrieve failed" in log and "Invalid API Key provided" in log
    for text in (log, str(refused.value)):
        assert key not in text and key[-4:] not in text and "_****" not in text, text
        assert "[redacted]" in text
    [call] = [c for c in stripe_on.calls if c.path.startswith("/v1/products/")]
    assert call.status == 401


def test_the_configured_key_is_redacted_whatever_its_form(settings: Any, written_log):
    settings.STRIPE_SECRET_KEY = "not a key at all 0123"
    logging.getLogger("billing.stripe_client").warning("Invalid API key: %r", settings.STRIPE_SECRET_KEY)
    try:
        raise ValueError(f"bad key {settings.STRIPE_SECRET_KEY}")
    except ValueError:
        logging.getLogger("billing").exception("failed", extra={"key": settings.STRIPE_SECRET_KEY})
    log = written_log.getvalue()
    assert "not a key at all" not in log and log.count("[redacted]") >= 2
