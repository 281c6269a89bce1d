"""dj-stripe signal receivers: entry points only, each calls one billing service.

dj-stripe verifies the signature, stores the event, re-fetches the object from
Stripe and syncs it (its own receivers are connected first, as djstripe comes
before billing in INSTALLED_APPS) and then sends these signals inside its
transaction. An exception here rolls all of it back and leaves the
WebhookEventTrigger with the error, to be retried from admin.
"""
from __future__ import annotations

from typing import Any

from djstripe.event_handlers import djstripe_receiver

from . import services
from .services.plan_changes import plan_changes_confirm


def _object(event: Any) -> dict[str, Any]:
    return (event.data or {}).get("object") or {}


@djstripe_receiver(["customer.subscription.created", "customer.subscription.updated",
                    "customer.subscription.deleted"])
def on_subscription_event(sender: Any, event: Any, **kwargs: Any) -> None:
    data = _object(event)
    services.subscription_apply(subscription_id=data["id"])
    if event.type != "customer.subscription.deleted":
        # once the state is applied: a support plan change that Stripe now shows is confirmed
        plan_changes_confirm(subscription_id=data["id"], state_data=data)


@djstripe_receiver("invoice.payment_succeeded")
def on_invoice_payment_succeeded(sender: Any, event: Any, **kwargs: Any) -> None:
    services.invoice_payment_succeeded(invoice_id=_object(event)["id"])


@djstripe_receiver("invoice.payment_failed")
def on_invoice_payment_failed(sender: Any, event: Any, **kwargs: Any) -> None:
    services.invoice_payment_failed(invoice_id=_object(event)["id"])


@djstripe_receiver("invoice.upcoming")
def on_invoice_upcoming(sender: Any, event: Any, **kwargs: Any) -> None:
    customer = _object(event).get("customer")
    services.invoice_upcoming(customer_id=customer["id"] if isinstance(customer, dict) else str(customer or ""))


@djstripe_receiver("customer.updated")
def on_customer_updated(sender: Any, event: Any, **kwargs: Any) -> None:
    services.customer_payment_apply(customer_id=_object(event)["id"])
