"""Who calls the API when it is a backend service rather than a signed-in user."""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .models import ServiceKey


class ServicePrincipal:
    """The authenticated caller when a service key is used."""

    is_authenticated = True
    is_active = True
    is_staff = False
    pk = None

    def __init__(self, key: ServiceKey) -> None:
        self.key = key

    def __str__(self) -> str:
        return f"service:{self.key.name}"
