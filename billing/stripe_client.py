"""The one seam between billing and Stripe.

Every call billing makes to Stripe goes through here: the key, the API host
(`STRIPE_API_HOST`, e.g. a local Stripe-compatible server in tests), the API
version and error translation live in one place. Every call that creates
something takes an idempotency key, so a retried call gets Stripe's first answer
instead of a second object. dj-stripe makes its own calls (re-fetching objects
while it processes webhooks) through the same `stripe` library and settings.
"""
from __future__ import annotations

import json
import logging
from typing import Any

import stripe
from django.conf import settings

from consensus_tokens.errors import ApplicationError
from consensus_tokens.logging import redact_secrets

logger = logging.getLogger(__name__)


class StripeNotConfigured(ApplicationError):
    status, code = 503, "billing_unavailable"


class StripeError(ApplicationError):
    status, code = 502, "stripe_error"


def is_configured() -> bool:
    return bool(getattr(settings, "STRIPE_SECRET_KEY", ""))


def require_configured() -> None:
    if not is_configured():
        raise StripeNotConfigured("Payments are not configured on this server (STRIPE_SECRET_KEY is not set).")


def _options() -> dict[str, Any]:
    require_configured()
    host = getattr(settings, "STRIPE_API_HOST", "")
    if host and stripe.api_base != host:
        # dj-stripe sets this once at import; follow the setting if it changed since.
        stripe.api_base = host
    from djstripe.settings import djstripe_settings

    return {"api_key": settings.STRIPE_SECRET_KEY, "stripe_version": djstripe_settings.STRIPE_API_VERSION}


def _call(what: str, func: Any, *args: Any, **kwargs: Any) -> Any:
    try:
        return func(*args, **_options(), **kwargs)
    except stripe.StripeError as exc:
        missing = getattr(exc, "code", "") == "resource_missing"
        # Stripe's messages may quote the key ("Invalid API Key provided: sk_test_…"): redact them
        # here, as this text also reaches API answers and admin; the log filter redacts the rest.
        detail = redact_secrets(str(exc.user_message or exc))
        logger.log(logging.INFO if missing else logging.WARNING, "stripe %s failed: %s", what, redact_secrets(str(exc)),
                   extra={"http_status": getattr(exc, "http_status", None), "stripe_code": getattr(exc, "code", None)})
        raise StripeError(f"Stripe refused {what}: {detail}",
                          extra={"stripeCode": getattr(exc, "code", None) or ""}) from exc


def _is_missing(exc: StripeError) -> bool:
    cause = exc.__cause__
    return isinstance(cause, stripe.InvalidRequestError) and (
        getattr(cause, "code", "") == "resource_missing" or getattr(cause, "http_status", 0) == 404)


def is_refusal(exc: StripeError) -> bool:
    """Stripe answered and refused the request (nothing was done), as opposed to an outage
    or a lost answer, after which the same request may be sent again."""
    cause = exc.__cause__
    return isinstance(cause, stripe.StripeError) and 400 <= (getattr(cause, "http_status", None) or 0) < 500 \
        and not isinstance(cause, (stripe.RateLimitError, stripe.APIConnectionError))


def as_dict(obj: Any) -> dict[str, Any]:
    """A Stripe object as plain JSON data (nested objects included)."""
    if isinstance(obj, dict):
        return obj
    return json.loads(str(obj))


# --- products and prices ---------------------------------------------------------------------------

def product_retrieve(product_id: str) -> Any | None:
    try:
        return _call("product retrieve", stripe.Product.retrieve, product_id)
    except StripeError as exc:
        if _is_missing(exc):
            return None
        raise


def product_create(*, product_id: str, name: str, metadata: dict[str, str], idempotency_key: str) -> Any:
    return _call("product create", stripe.Product.create, id=product_id, name=name, metadata=metadata,
                 idempotency_key=idempotency_key)


def product_update(*, product_id: str, name: str) -> Any:
    return _call("product update", stripe.Product.modify, product_id, name=name)


def prices_by_lookup_keys(lookup_keys: list[str]) -> list[Any]:
    result = _call("price list", stripe.Price.list, lookup_keys=lookup_keys, active=True, limit=100)
    return list(result.data)


def price_create(*, product_id: str, unit_amount_cents: int, currency: str, interval: str, lookup_key: str,
                 metadata: dict[str, str], transfer_lookup_key: bool, idempotency_key: str) -> Any:
    return _call("price create", stripe.Price.create, product=product_id, unit_amount=unit_amount_cents,
                 currency=currency, recurring={"interval": interval}, lookup_key=lookup_key, metadata=metadata,
                 transfer_lookup_key=transfer_lookup_key, idempotency_key=idempotency_key)


def price_deactivate(price_id: str) -> Any:
    return _call("price update", stripe.Price.modify, price_id, active=False)


# --- customers, checkout, portal ------------------------------------------------------------------

def customer_create(*, email: str, name: str, metadata: dict[str, Any], idempotency_key: str) -> Any:
    return _call("customer create", stripe.Customer.create, email=email, name=name or None, metadata=metadata,
                 idempotency_key=idempotency_key)


def checkout_session_create(*, customer_id: str, price_id: str, success_url: str, cancel_url: str,
                            client_reference_id: str, metadata: dict[str, str], idempotency_key: str) -> Any:
    return _call("checkout session create", stripe.checkout.Session.create, mode="subscription",
                 customer=customer_id, line_items=[{"price": price_id, "quantity": 1}], success_url=success_url,
                 cancel_url=cancel_url, client_reference_id=client_reference_id, metadata=metadata,
                 subscription_data={"metadata": metadata}, idempotency_key=idempotency_key)


def portal_session_create(*, customer_id: str, return_url: str, idempotency_key: str) -> Any:
    return _call("billing portal session create", stripe.billing_portal.Session.create, customer=customer_id,
                 return_url=return_url, idempotency_key=idempotency_key)


# --- subscriptions and invoices -------------------------------------------------------------------

def subscription_retrieve(subscription_id: str) -> Any | None:
    try:
        return _call("subscription retrieve", stripe.Subscription.retrieve, subscription_id)
    except StripeError as exc:
        if _is_missing(exc):
            return None
        raise


def subscription_price_change(*, subscription_id: str, params: dict[str, Any], idempotency_key: str) -> Any:
    """Move a subscription's item to another price (support's plan change). `params` are
    built and recorded by the caller (items, proration_behavior, metadata), so a retry
    sends exactly the same request under the same key."""
    return _call("subscription update", stripe.Subscription.modify, subscription_id,
                 idempotency_key=idempotency_key, **params)


def invoice_item_create(*, customer_id: str, amount_cents: int, currency: str, description: str,
                        metadata: dict[str, str], period_start: int, period_end: int, subscription_id: str | None,
                        idempotency_key: str) -> Any:
    params: dict[str, Any] = {
        "customer": customer_id, "amount": amount_cents, "currency": currency, "description": description,
        "metadata": metadata, "period": {"start": period_start, "end": period_end},
    }
    if subscription_id:
        params["subscription"] = subscription_id
    return _call("invoice item create", stripe.InvoiceItem.create, idempotency_key=idempotency_key, **params)


def invoice_create_now(*, customer_id: str, description: str, metadata: dict[str, str],
                       idempotency_key: str) -> Any:
    """An invoice for the customer's pending items (a draft until finalized)."""
    return _call("invoice create", stripe.Invoice.create, customer=customer_id, description=description,
                 metadata=metadata, pending_invoice_items_behavior="include", auto_advance=True,
                 collection_method="charge_automatically", idempotency_key=idempotency_key)


def invoice_finalize(*, invoice_id: str, idempotency_key: str) -> Any:
    """Finalize a draft invoice now, so Stripe charges it instead of waiting an hour."""
    return _call("invoice finalize", stripe.Invoice.finalize_invoice, invoice_id, auto_advance=True,
                 idempotency_key=idempotency_key)


# --- webhook endpoints ----------------------------------------------------------------------------

def webhook_endpoints_list() -> list[Any]:
    return list(_call("webhook endpoint list", stripe.WebhookEndpoint.list, limit=100).data)


def webhook_endpoint_create(*, url: str, enabled_events: list[str], metadata: dict[str, str],
                            idempotency_key: str) -> Any:
    from djstripe.settings import djstripe_settings

    return _call("webhook endpoint create", stripe.WebhookEndpoint.create, url=url, enabled_events=enabled_events,
                 metadata=metadata, api_version=djstripe_settings.STRIPE_API_VERSION,
                 idempotency_key=idempotency_key)


def webhook_endpoint_update(*, endpoint_id: str, url: str, enabled_events: list[str]) -> Any:
    return _call("webhook endpoint update", stripe.WebhookEndpoint.modify, endpoint_id, url=url,
                 enabled_events=enabled_events, disabled=False)


def webhook_endpoint_delete(endpoint_id: str) -> None:
    _call("webhook endpoint delete", stripe.WebhookEndpoint.delete, endpoint_id)
