"""Every change made in Django admin also lands in metering's audit log (which
admin itself cannot edit), with the staff member and the request id."""
from __future__ import annotations

from django.contrib.admin.models import ADDITION, CHANGE, DELETION

from consensus_tokens.logging import request_id_var

_RESULTS = {ADDITION: "added", CHANGE: "changed", DELETION: "deleted"}


def admin_change_audited(sender, instance, created, **kwargs) -> None:
    if not created:
        return
    from metering.services import RequestContext, audit_record

    staff = instance.user
    audit_record(ctx=RequestContext(actor=staff.get_username() if staff else "", request_id=request_id_var.get()),
                 user_id=None, action="admin_change", result=_RESULTS.get(instance.action_flag, "changed"),
                 detail={"model": f"{instance.content_type.app_label}.{instance.content_type.model}"
                         if instance.content_type_id else "", "objectId": instance.object_id or "",
                         "object": instance.object_repr, "change": instance.get_change_message()})
