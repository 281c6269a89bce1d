"""Signed unsubscribe links: the token names a user and one kind of usage
e-mail, so the link works without logging in and cannot be forged or pointed
at someone else. It carries no expiry: an old e-mail's link must still work."""
from __future__ import annotations

from django.conf import settings
from django.core import signing
from django.urls import reverse

from consensus_tokens.errors import ApplicationError

from .selectors import PREFERENCE_KINDS

_SALT = "alerts.unsubscribe"


def unsubscribe_token_make(*, user_id: int, preference: str) -> str:
    if preference not in PREFERENCE_KINDS:
        raise ValueError(f"not a usage e-mail kind: {preference}")
    return signing.dumps({"u": user_id, "k": preference}, salt=_SALT)


def unsubscribe_token_read(*, token: str) -> tuple[int, str]:
    try:
        data = signing.loads(token, salt=_SALT)
        user_id, preference = int(data["u"]), str(data["k"])
    except (signing.BadSignature, KeyError, TypeError, ValueError):
        raise ApplicationError("This unsubscribe link is not valid.", code="invalid_token") from None
    if preference not in PREFERENCE_KINDS:
        raise ApplicationError("This unsubscribe link is not valid.", code="invalid_token")
    return user_id, preference


def unsubscribe_url(*, user_id: int, preference: str) -> str:
    token = unsubscribe_token_make(user_id=user_id, preference=preference)
    return settings.SITE_URL + reverse("alerts:unsubscribe", kwargs={"token": token})


def dashboard_url() -> str:
    return settings.SITE_URL + "/dashboard/"
