from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from consensus_tokens.client_ip import client_ip

from ..principals import ServicePrincipal


@dataclass(frozen=True)
class RequestContext:
    """Who is asking: recorded on ledger and audit rows."""

    service_key_id: int | None = None
    client_ip: str | None = None
    user_agent: str = ""
    request_id: str = ""
    actor: str = ""


SYSTEM = RequestContext(actor="system")


def request_context(request: Any) -> RequestContext:
    """Who a DRF request comes from, as ledger and audit rows record it."""
    principal = request.user
    return RequestContext(
        service_key_id=principal.key.pk if isinstance(principal, ServicePrincipal) else None,
        client_ip=client_ip(request) or None,
        user_agent=request.META.get("HTTP_USER_AGENT", ""),
        request_id=getattr(request._request, "request_id", ""),
        actor="" if isinstance(principal, ServicePrincipal) else str(principal),
    )
