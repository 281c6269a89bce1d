"""The dj-stripe receiver that confirms support's plan changes: connected after
billing.webhooks' (apps.py imports this module second), so it runs once the
subscription's state has been applied, in the same transaction."""
from __future__ import annotations

from typing import Any

from djstripe.event_handlers import djstripe_receiver

from .services.plan_changes import plan_changes_confirm


@djstripe_receiver(["customer.subscription.created", "customer.subscription.updated"])
def on_subscription_plan_change(sender: Any, event: Any, **kwargs: Any) -> None:
    data = (event.data or {}).get("object") or {}
    plan_changes_confirm(subscription_id=data["id"], state_data=data)
