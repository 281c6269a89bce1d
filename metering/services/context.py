from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RequestContext:
    """Who is asking: recorded on ledger and audit rows."""

    service_key_id: int | None = None
    client_ip: str | None = None
    user_agent: str = ""
    request_id: str = ""
    actor: str = ""


SYSTEM = RequestContext(actor="system")
