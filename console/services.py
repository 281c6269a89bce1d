"""The "support" staff group: what support may do in the console."""
from __future__ import annotations

from django.contrib.auth.models import Group, Permission
from django.db import transaction

SUPPORT_GROUP = "support"

# (app label, model, actions). Tier prices are guarded by field (TierAdmin); service
# keys are superuser-only whatever a group holds, so none of their permissions are here.
SUPPORT_PERMISSIONS: list[tuple[str, str, tuple[str, ...]]] = [
    ("metering", "account", ("view", "change")),
    ("metering", "tier", ("view", "change")),
    ("metering", "operationtype", ("view", "add", "change")),
    ("metering", "provider", ("view", "change")),
    ("metering", "usageperiod", ("view",)),
    ("metering", "ledgerentry", ("view",)),
    ("metering", "reservation", ("view",)),
    ("metering", "auditlog", ("view",)),
    ("alerts", "alertevent", ("view", "change")),
    ("alerts", "anomalyflag", ("view", "change")),
    ("alerts", "emailpreference", ("view",)),
    ("billing", "billingaccount", ("view",)),
    ("billing", "overageinvoice", ("view", "change")),
    ("billing", "tierprice", ("view",)),
    ("billing", "planchange", ("view", "change")),
    ("billing", "tiercomp", ("view",)),
    ("djstripe", "webhookeventtrigger", ("view",)),
    ("django_celery_beat", "periodictask", ("view", "change")),
    ("django_celery_beat", "crontabschedule", ("view",)),
    ("django_celery_beat", "intervalschedule", ("view",)),
]


def support_group_ensure() -> tuple[Group, list[str]]:
    """Create or update the group with exactly these permissions (idempotent).
    Returns the group and the permissions that do not exist (an app not migrated)."""
    wanted = {(app, f"{action}_{model}") for app, model, actions in SUPPORT_PERMISSIONS for action in actions}
    found = {(p.content_type.app_label, p.codename): p for p in
             Permission.objects.select_related("content_type").filter(
                 content_type__app_label__in={a for a, _ in wanted}, codename__in={c for _, c in wanted})}
    with transaction.atomic():
        group, _ = Group.objects.get_or_create(name=SUPPORT_GROUP)
        group.permissions.set([found[k] for k in wanted if k in found])
    return group, sorted(f"{a}.{c}" for a, c in wanted - set(found))
