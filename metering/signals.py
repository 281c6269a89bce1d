"""What metering announces. Receivers run inside the transaction that changed
the usage, so what they write commits or rolls back with it; anything outside
the database (e-mail, Celery) belongs in transaction.on_commit."""
import django.dispatch

# Sent when a period's `used` grew: kwargs period (UsagePeriod, after), used_before.
usage_recorded = django.dispatch.Signal()
