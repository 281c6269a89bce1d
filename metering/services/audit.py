from __future__ import annotations

from typing import Any

from django.utils import timezone

from ..models import Account, AuditLog
from .context import RequestContext


def audit_row(*, ctx: RequestContext, user_id: int | None, action: str, result: str, tokens: int | None = None,
              operation_type: str = "", operation_id: str = "", detail: dict[str, Any] | None = None) -> AuditLog:
    return AuditLog(
        user_id=user_id, action=action, result=result, tokens=tokens, operation_type=operation_type or "",
        operation_id=operation_id or "", client_ip=ctx.client_ip, user_agent=(ctx.user_agent or "")[:300],
        service_key_id=ctx.service_key_id, actor=ctx.actor, request_id=ctx.request_id, detail=detail or {},
        created_at=timezone.now(),
    )


def known_user_id(user_id: int | None) -> int | None:
    """The id if that user has an account, else None: a refusal found before the user was
    looked up (an unknown operation type) may name a user who does not exist, and the
    audit row must not carry a dangling foreign key (the insert would fail)."""
    if user_id is None or not Account.objects.filter(user_id=user_id).exists():
        return None
    return user_id


def audit_record(**kwargs: Any) -> AuditLog:
    row = audit_row(**kwargs)
    row.save()
    return row
