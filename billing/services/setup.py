"""`setup_stripe`: products, prices and our webhook endpoint in Stripe; and staff's
retry of a failed webhook."""
from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass, field
from typing import Any

from django.conf import settings
from django.db import transaction
from django.urls import reverse

from consensus_tokens.errors import ApplicationError
from metering.models import Tier

from .. import stripe_client
from ..models import TierPrice
from .common import CURRENCY, WEBHOOK_EVENTS, stripe_id


def webhook_trigger_retry(*, trigger_id: int) -> Any:
    """Process a stored webhook again (staff's retry in admin). A trigger that failed
    rolled back everything it did, so processing it again is the first time."""
    from traceback import format_exc

    from djstripe.models import WebhookEventTrigger
    from djstripe.settings import djstripe_settings

    trigger = WebhookEventTrigger.objects.select_related("webhook_endpoint").get(pk=trigger_id)
    if not trigger.valid:
        raise ApplicationError("This webhook did not pass signature verification; it cannot be processed.",
                               code="webhook_invalid")
    if trigger.processed:
        return trigger
    endpoint = trigger.webhook_endpoint
    api_key = djstripe_settings.get_default_api_key(endpoint.livemode if endpoint else None)
    try:
        with transaction.atomic():
            trigger.process(save=False, api_key=api_key)
            trigger.save()
    except Exception as exc:
        trigger.refresh_from_db()
        trigger.exception = str(exc)[:128]
        trigger.traceback = format_exc()
        trigger.save(update_fields=["exception", "traceback", "updated"])
        raise ApplicationError(f"Processing failed again: {exc}", code="webhook_failed") from exc
    return trigger


@dataclass
class SetupReport:
    created: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    existing: list[str] = field(default_factory=list)


def webhook_endpoint_url() -> tuple[str, uuid.UUID]:
    """Our endpoint's URL; its UUID is derived from SITE_URL so every run (and every
    process) names the same endpoint."""
    endpoint_uuid = uuid.uuid5(uuid.NAMESPACE_URL, f"{settings.SITE_URL}/stripe/webhook")
    path = reverse("djstripe:djstripe_webhook_by_uuid", kwargs={"uuid": endpoint_uuid})
    return f"{settings.SITE_URL}{path}", endpoint_uuid


def stripe_setup() -> SetupReport:
    """Create or update the Products and Prices of every priced tier and our webhook
    endpoint in Stripe, sync them into dj-stripe and link prices to tiers. Safe to
    run again: things are found by id / lookup key first, and creates carry
    idempotency keys."""
    from djstripe.models import Price, Product

    stripe_client.require_configured()
    report = SetupReport()
    key = settings.STRIPE_SECRET_KEY
    for tier in Tier.objects.all():
        if not (tier.monthly_price_cents or tier.yearly_price_cents):
            continue
        product_id = f"ct_tier_{tier.slug}"
        product = stripe_client.product_retrieve(product_id)
        if product is None:
            product = stripe_client.product_create(product_id=product_id, name=f"Consensus Tokens {tier.name}",
                                                   metadata={"tier": tier.slug},
                                                   idempotency_key=f"ct-setup-product-{tier.slug}")
            report.created.append(f"product {product_id}")
        elif product["name"] != f"Consensus Tokens {tier.name}":
            product = stripe_client.product_update(product_id=product_id, name=f"Consensus Tokens {tier.name}")
            report.updated.append(f"product {product_id}")
        else:
            report.existing.append(f"product {product_id}")
        Product.sync_from_stripe_data(product, api_key=key)

        for interval, amount in (("month", tier.monthly_price_cents), ("year", tier.yearly_price_cents)):
            if not amount:
                continue
            lookup_key = f"{tier.slug}_{interval}ly"
            found = stripe_client.prices_by_lookup_keys([lookup_key])
            current = found[0] if found else None
            if (current is not None and current["unit_amount"] == amount and current["currency"] == CURRENCY
                    and (current["recurring"] or {}).get("interval") == interval
                    and stripe_id(current["product"]) == product_id):
                price = current
                report.existing.append(f"price {lookup_key} ({price['id']})")
            else:
                price = stripe_client.price_create(
                    product_id=product_id, unit_amount_cents=amount, currency=CURRENCY, interval=interval,
                    lookup_key=lookup_key, metadata={"tier": tier.slug, "interval": interval},
                    transfer_lookup_key=current is not None,
                    idempotency_key=f"ct-setup-price-{lookup_key}-{amount}")
                report.created.append(f"price {lookup_key} ({price['id']})")
                if current is not None and current["id"] != price["id"]:
                    Price.sync_from_stripe_data(stripe_client.price_deactivate(current["id"]), api_key=key)
            Price.sync_from_stripe_data(price, api_key=key)
            with transaction.atomic():
                TierPrice.objects.filter(tier=tier, interval=interval, active=True).exclude(
                    stripe_price_id=price["id"]).update(active=False)
                TierPrice.objects.update_or_create(
                    stripe_price_id=price["id"],
                    defaults={"tier": tier, "interval": interval, "lookup_key": lookup_key,
                              "unit_amount_cents": amount, "active": True})
    _webhook_endpoint_setup(report=report)
    return report


def _webhook_endpoint_setup(*, report: SetupReport) -> None:
    from djstripe.models import WebhookEndpoint

    url, endpoint_uuid = webhook_endpoint_url()
    if settings.STRIPE_WEBHOOK_SECRET:
        _stripe_cli_endpoint(url=url, endpoint_uuid=endpoint_uuid, report=report)
        return
    local = WebhookEndpoint.objects.filter(djstripe_uuid=endpoint_uuid).first()
    remote = {e["id"]: e for e in stripe_client.webhook_endpoints_list()}
    if local is not None and local.id in remote and local.secret:
        current = remote[local.id]
        if (current["url"] != url or sorted(current["enabled_events"]) != sorted(WEBHOOK_EVENTS)
                or current.get("status") != "enabled"):
            data = stripe_client.as_dict(stripe_client.webhook_endpoint_update(
                endpoint_id=local.id, url=url, enabled_events=WEBHOOK_EVENTS))
            data["secret"] = local.secret
            WebhookEndpoint.sync_from_stripe_data(data, api_key=settings.STRIPE_SECRET_KEY)
            report.updated.append(f"webhook endpoint {local.id} {url}")
        else:
            report.existing.append(f"webhook endpoint {local.id} {url}")
        return
    # Stripe shows an endpoint's secret only when it is created: an endpoint of ours we
    # have no secret for is useless, so it is replaced.
    for endpoint in remote.values():
        if (endpoint.get("metadata") or {}).get("djstripe_uuid") == str(endpoint_uuid):
            stripe_client.webhook_endpoint_delete(endpoint["id"])
            report.updated.append(f"webhook endpoint {endpoint['id']} replaced (its secret is unknown here)")
    # The key names what this run saw, so a rerun after a crash gets the same endpoint
    # back, while a rerun after someone deleted it makes a new one.
    seen = hashlib.sha256(" ".join(sorted(remote) + [local.id if local else ""]).encode()).hexdigest()[:16]
    created = stripe_client.webhook_endpoint_create(
        url=url, enabled_events=WEBHOOK_EVENTS, metadata={"djstripe_uuid": str(endpoint_uuid)},
        idempotency_key=f"ct-setup-webhook-{endpoint_uuid}-{seen}")
    WebhookEndpoint.objects.filter(djstripe_uuid=endpoint_uuid).exclude(id=created["id"]).delete()
    WebhookEndpoint.sync_from_stripe_data(created, api_key=settings.STRIPE_SECRET_KEY)
    report.created.append(f"webhook endpoint {created['id']} {url}")


def _stripe_cli_endpoint(*, url: str, endpoint_uuid: uuid.UUID, report: SetupReport) -> None:
    """The local loop: `stripe listen --forward-to <url>` signs with the CLI's own secret,
    given here as STRIPE_WEBHOOK_SECRET. Our endpoint is registered locally only (Stripe
    cannot reach a developer's machine) and verifies signatures with that secret."""
    from djstripe.enums import WebhookEndpointStatus
    from djstripe.models import WebhookEndpoint
    from djstripe.settings import djstripe_settings

    fields = {"url": url, "secret": settings.STRIPE_WEBHOOK_SECRET, "enabled_events": WEBHOOK_EVENTS,
              "status": WebhookEndpointStatus.enabled, "livemode": False,
              "api_version": djstripe_settings.STRIPE_API_VERSION}
    endpoint = WebhookEndpoint.objects.filter(djstripe_uuid=endpoint_uuid).first()
    if endpoint is None:
        WebhookEndpoint.objects.create(id=f"we_cli_{endpoint_uuid.hex[:24]}", djstripe_uuid=endpoint_uuid, **fields)
        report.created.append(f"webhook endpoint for the Stripe CLI: stripe listen --forward-to {url}")
        return
    changed = any(getattr(endpoint, name) != value for name, value in fields.items())
    for name, value in fields.items():
        setattr(endpoint, name, value)
    endpoint.save()
    (report.updated if changed else report.existing).append(
        f"webhook endpoint for the Stripe CLI: stripe listen --forward-to {url}")
