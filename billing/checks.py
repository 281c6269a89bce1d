"""Billing's system checks (registered in BillingConfig.ready): they run with every
`manage.py` command, `check --deploy` included, which the deployment runs first."""
from __future__ import annotations

import re
from typing import Any

from django.conf import settings
from django.core.checks import Error, register

# Stripe's secret keys (sk_) and restricted keys (rk_), test or live: the prefix, then
# letters, digits and underscores only (no spaces, quotes or line breaks pasted with it).
STRIPE_SECRET_KEY_FORM = re.compile(r"(?:sk|rk)_(?:test|live)_[A-Za-z0-9_]{8,}")


@register()
def check_stripe_secret_key(app_configs: Any = None, **kwargs: Any) -> list[Error]:
    """A set STRIPE_SECRET_KEY has a Stripe key's form. The message never shows the value:
    it is a secret, and check output ends up in deploy logs."""
    key = getattr(settings, "STRIPE_SECRET_KEY", "") or ""
    if not key or STRIPE_SECRET_KEY_FORM.fullmatch(key):
        return []
    return [Error(
        "STRIPE_SECRET_KEY is malformed (its value is not shown).",
        hint="It must be a Stripe secret or restricted key: sk_test_, sk_live_, rk_test_ or rk_live_ followed by "
             "letters, digits or underscores, with no spaces, quotes or line breaks.",
        id="billing.E001")]
