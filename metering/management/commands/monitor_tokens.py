"""`python manage.py monitor_tokens`: a live terminal view of token operations.

Reads the audit log (every token request, refused ones included) and the ledger:
operations per second over the last window, refusals by reason, the top users by
tokens consumed, and the most recent errors. Refreshes every --interval seconds
until interrupted; --once prints one snapshot and exits.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.core.management.base import BaseCommand
from django.db import connection
from django.db.models import Count, Sum
from django.utils import timezone

from metering.models import AuditLog, LedgerEntry, Reservation

# Audit results that are a normal answer, not a refusal or an error.
OK_RESULTS = frozenset({"recorded", "replayed", "reserved", "released", "settled", "expired", "estimated",
                        "sufficient", "insufficient"})


@dataclass(frozen=True)
class Snapshot:
    at: datetime
    window_seconds: int
    operations: dict[str, int]  # action -> count in the window
    refusals: dict[str, int]  # result -> count in the window
    tokens_consumed: int
    top_users: list[tuple[str, int, int]]  # (username, tokens, operations)
    open_reservations: int
    recent_errors: list[AuditLog]

    @property
    def ops_per_second(self) -> float:
        return sum(self.operations.values()) / self.window_seconds


def snapshot_take(*, window_seconds: int = 60, top: int = 10, errors: int = 10,
                  now: datetime | None = None) -> Snapshot:
    now = now or timezone.now()
    since = now - timedelta(seconds=window_seconds)
    recent = AuditLog.objects.filter(created_at__gt=since, created_at__lte=now)
    operations = dict(recent.values_list("action").annotate(n=Count("id")).order_by())
    refusals = dict(recent.exclude(result__in=OK_RESULTS).values_list("result").annotate(n=Count("id")).order_by())
    # Top users over the last hour (a minute is too short to rank on), by tokens.
    consumption = LedgerEntry.objects.filter(kind=LedgerEntry.Kind.CONSUMPTION, created_at__gt=now - timedelta(hours=1),
                                             created_at__lte=now)
    consumed_window = consumption.filter(created_at__gt=since).aggregate(t=Sum("used_delta"))["t"] or 0
    top_users = [(row["account__user__username"], row["tokens"], row["ops"]) for row in
                 consumption.values("account__user__username").annotate(tokens=Sum("used_delta"), ops=Count("id"))
                 .order_by("-tokens")[:top]]
    recent_errors = list(AuditLog.objects.exclude(result__in=OK_RESULTS).select_related("user")
                         .order_by("-created_at", "-id")[:errors])
    return Snapshot(at=now, window_seconds=window_seconds, operations=operations, refusals=refusals,
                    tokens_consumed=consumed_window, top_users=top_users,
                    open_reservations=Reservation.objects.filter(status=Reservation.Status.HELD).count(),
                    recent_errors=recent_errors)


def snapshot_render(snap: Snapshot) -> str:
    lines = [f"Consensus Tokens — {snap.at:%Y-%m-%d %H:%M:%S} UTC, last {snap.window_seconds} s",
             "",
             f"Operations/s: {snap.ops_per_second:.2f}   tokens consumed: {snap.tokens_consumed:,}   "
             f"open reservations: {snap.open_reservations:,}"]
    if snap.operations:
        lines.append("  " + "  ".join(f"{action}={n}" for action, n in sorted(snap.operations.items())))
    refused = sum(snap.refusals.values())
    lines += ["", f"Refusals: {refused}"]
    lines += [f"  {reason:<28} {n:>8}" for reason, n in sorted(snap.refusals.items(), key=lambda kv: -kv[1])]
    lines += ["", "Top users (last hour)", f"  {'user':<24} {'tokens':>12} {'ops':>8}"]
    lines += [f"  {name:<24} {tokens:>12,} {ops:>8}" for name, tokens, ops in snap.top_users] or ["  (none)"]
    lines += ["", "Recent errors"]
    for row in snap.recent_errors:
        who = row.user.username if row.user else (row.actor or "-")
        lines.append(f"  {row.created_at:%H:%M:%S} {row.action:<14} {row.result:<24} {who:<16} "
                     f"{row.operation_id[:24]:<24} {row.request_id[:16]}")
    if not snap.recent_errors:
        lines.append("  (none)")
    return "\n".join(lines)


class Command(BaseCommand):
    help = "Live view of token operations per second, refusals, top users and recent errors."

    def add_arguments(self, parser):
        parser.add_argument("--once", action="store_true", help="Print one snapshot and exit.")
        parser.add_argument("--interval", type=float, default=2.0, help="Seconds between refreshes.")
        parser.add_argument("--window", type=int, default=60, help="Seconds of history the rates cover.")
        parser.add_argument("--top", type=int, default=10, help="How many users to rank.")

    def handle(self, *args, once: bool, interval: float, window: int, top: int, **options):
        if once:
            self.stdout.write(snapshot_render(snapshot_take(window_seconds=window, top=top)))
            return
        try:
            while True:
                text = snapshot_render(snapshot_take(window_seconds=window, top=top))
                # Clear the screen and home the cursor, then draw the frame.
                self.stdout.write("\x1b[2J\x1b[H" + text + f"\n\n(refreshing every {interval:g} s; Ctrl-C to stop)")
                self.stdout.flush()
                connection.close_if_unusable_or_obsolete()
                time.sleep(interval)
        except KeyboardInterrupt:
            self.stdout.write("")
