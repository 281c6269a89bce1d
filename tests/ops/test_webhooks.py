"""A Stripe webhook replayed outside Stripe's tolerance is refused with nothing
changed (signature and tampering tests are in tests/billing), and webhook outcomes
reach the Prometheus counters. Stripe is the fake from tests/billing, over HTTP."""
from __future__ import annotations

import json
import time

from djstripe.models import Event, WebhookEventTrigger
from prometheus_client import REGISTRY

from billing.models import BillingAccount
from metering.models import Account
from tests.billing.conftest import checkout, deliver_all, e2e, fake_stripe, site, stripe_on  # noqa: F401 - fixtures


def webhooks_counted(result: str) -> float:
    return REGISTRY.get_sample_value("ct_webhooks_total", {"result": result}) or 0.0


@e2e
def test_a_replay_outside_the_tolerance_is_refused_and_changes_nothing(site, client, make_user, settings):
    fake = site
    user = make_user("basic")
    created, paid = checkout(fake, client, user, "pro")
    secret = next(iter(fake.webhook_secrets.values()))
    invalid, processed = webhooks_counted("invalid"), webhooks_counted("processed")

    # A genuine signature, captured and sent again ten minutes later (Stripe's tolerance is five).
    stale = fake.sign(json.dumps(created), secret, timestamp=int(time.time()) - 600)
    status, _ = fake.deliver(created, signature=stale)
    assert status == 400
    assert Account.objects.get(user=user).tier.slug == "basic"
    assert not Event.objects.filter(id=created["id"]).exists()
    assert not BillingAccount.objects.filter(account__user=user, stripe_subscription_id__gt="").exists()
    assert WebhookEventTrigger.objects.filter(valid=False).count() == 1
    assert webhooks_counted("invalid") - invalid == 1

    deliver_all(fake, [created, paid])  # delivered in time, the same events are accepted
    assert Account.objects.get(user=user).tier.slug == "pro"
    assert webhooks_counted("processed") - processed == 2
