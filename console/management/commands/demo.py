"""Demo data: three users (one per tier) with two months of history, a support user and a
superuser for the console, and a service key.

Safe to run again: users, periods and history are created once; the service key
is derived from SECRET_KEY, so every run prints the same working key.
"""
import hashlib
import hmac
import random
from datetime import timedelta

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand
from django.db import transaction
from django.utils import timezone

from console.services import support_group_ensure
from metering.models import Account, LedgerEntry, ServiceKey, Tier, UsagePeriod
from metering.periods import calendar_month
from metering.services import account_terms, ledger_rollup_refresh, period_current
from metering.services.keys import hash_key

DEMO_USERS = [
    # username, tier, share of the limit used in the current period, in the two before
    ("alice", "basic", 0.40, (0.70, 0.95)),
    ("bob", "pro", 0.60, (0.85, 1.20)),
    ("carol", "enterprise", 0.30, (0.55, 0.65)),
]
OPERATIONS = [("consensus", 0.35), ("analysis", 0.30), ("summary", 0.20), ("comparison", 0.15)]
MODELS = [("openai", "gpt-4o"), ("openai", "gpt-4.1-mini"), ("anthropic", "claude-sonnet-4")]
# Console logins: what support staff see (the "support" group) and what a superuser sees.
DEMO_STAFF = [("support", "support"), ("admin", "superuser")]


def demo_password(username: str) -> str:
    return f"{username}-demo-2026"


def demo_service_key() -> str:
    digest = hmac.new(settings.SECRET_KEY.encode(), b"demo-service-key", hashlib.sha256).hexdigest()
    return f"ct_demo_{digest[:40]}"


class Command(BaseCommand):
    help = "Create demo tiers' users, two months of usage history and a service key (idempotent)."

    def handle(self, *args, **options):
        User = get_user_model()
        now = timezone.now()
        for username, tier_slug, current_share, past_shares in DEMO_USERS:
            tier = Tier.objects.get(slug=tier_slug)
            user, created = User.objects.get_or_create(username=username,
                                                       defaults={"email": f"{username}@example.com"})
            if created:
                user.set_password(demo_password(username))
                user.save()
            account, _ = Account.objects.get_or_create(user=user, defaults={"tier": tier})
            if not LedgerEntry.objects.filter(account=account).exists():
                self._history(account, now, current_share, past_shares, seed=username)
            self.stdout.write(f"USER {username} id={user.pk} tier={tier_slug} password={demo_password(username)}")

        self._staff()
        raw = demo_service_key()
        ServiceKey.objects.get_or_create(
            hashed_key=hash_key(raw),
            defaults={"name": "demo", "prefix": raw[:12], "scope": ServiceKey.Scope.CONSUME,
                      "environment": settings.DEPLOY_ENVIRONMENT})
        self.stdout.write(f"SERVICE_KEY={raw}")
        ledger_rollup_refresh()  # so the demo dashboard reads daily rollups from the start

    def _staff(self) -> None:
        User = get_user_model()
        # The group's permissions are setup_support_group's; ensuring it here lets demo run alone.
        support_group, _ = support_group_ensure()
        for username, role in DEMO_STAFF:
            user, created = User.objects.get_or_create(
                username=username, defaults={"email": f"{username}@example.com", "is_staff": True,
                                             "is_superuser": role == "superuser"})
            if created:
                user.set_password(demo_password(username))
                user.save(update_fields=["password"])
                if role == "support":
                    user.groups.add(support_group)
            self.stdout.write(f"STAFF {username} password={demo_password(username)}")

    @transaction.atomic
    def _history(self, account: Account, now, current_share: float, past_shares, *, seed: str) -> None:
        rng = random.Random(seed)
        current = period_current(account=account, now=now)
        limit, cap, rate = account_terms(account)
        start_prev, _ = calendar_month(current.starts_at - timedelta(days=1))
        start_prev2, _ = calendar_month(start_prev - timedelta(days=1))
        periods = []
        for start, share in ((start_prev2, past_shares[0]), (start_prev, past_shares[1])):
            _, end = calendar_month(start)
            period, _ = UsagePeriod.objects.get_or_create(
                account=account, starts_at=start,
                defaults={"ends_at": end, "token_limit": limit, "cap": cap, "overage_rate": rate,
                          "closed_at": end})
            periods.append((period, share, end))
        periods.append((current, current_share, now))
        for period, share, until in periods:
            target = min(int(period.token_limit * share), period.cap)
            entries = self._entries(account, period, target, until, rng)
            LedgerEntry.objects.bulk_create(entries, batch_size=1000)
            UsagePeriod.objects.filter(pk=period.pk).update(used=sum(e.used_delta for e in entries))

    def _entries(self, account, period, target, until, rng):
        entries, total, n = [], 0, 0
        span = max((until - period.starts_at).total_seconds(), 60)
        while total < target:
            op = rng.choices([o for o, _ in OPERATIONS], weights=[w for _, w in OPERATIONS])[0]
            provider, model = rng.choice(MODELS)
            tokens = min(target - total, rng.randint(150, 1400))
            estimated = int(tokens * rng.uniform(0.85, 1.2))
            n += 1
            entries.append(LedgerEntry(
                account=account, period=period, kind=LedgerEntry.Kind.CONSUMPTION, used_delta=tokens,
                operation_id=f"demo-{period.starts_at:%Y%m}-{n}", operation_type=op, provider=provider, model=model,
                estimated_tokens=estimated, actual_tokens=tokens,
                created_at=period.starts_at + timedelta(seconds=rng.uniform(0, span - 1))))
            total += tokens
        entries.sort(key=lambda e: e.created_at)
        return entries
