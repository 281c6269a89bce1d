"""Create or update the Stripe Products/Prices of every tier and our webhook endpoint.

Safe to run again (lookup keys and idempotency keys); prints what it created and
what already existed. The seed's "setup-stripe" step."""
from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError

from billing.services import stripe_setup
from consensus_tokens.errors import ApplicationError


class Command(BaseCommand):
    help = "Create or update Stripe products, prices (lookup keys <tier>_monthly/<tier>_yearly) and the webhook endpoint."

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            report = stripe_setup()
        except ApplicationError as exc:
            raise CommandError(exc.message) from exc
        for line in report.created:
            self.stdout.write(f"CREATED {line}")
        for line in report.updated:
            self.stdout.write(f"UPDATED {line}")
        for line in report.existing:
            self.stdout.write(f"EXISTS {line}")
        self.stdout.write(self.style.SUCCESS(
            f"setup_stripe: {len(report.created)} created, {len(report.updated)} updated, "
            f"{len(report.existing)} already existed"))
