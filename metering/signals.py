"""What metering announces. Receivers run inside the transaction that changed
the usage, so what they write commits or rolls back with it; anything outside
the database (e-mail, Celery) belongs in transaction.on_commit."""
import django.dispatch

# Sent when a period's `used` grew: kwargs period (UsagePeriod, after), used_before.
usage_recorded = django.dispatch.Signal()

# Sent once for a set-based change to many periods (a batch) instead of usage_recorded
# per period: kwargs changes, a list of (period after, used_before). Whoever listens to
# usage_recorded must listen here too.
usage_recorded_many = django.dispatch.Signal()

# Sent for each period closed (the rollover job, or billing cutting it short), inside the
# closing transaction: kwargs period (UsagePeriod, closed_at set). Sent once per period:
# a closed period is never closed again.
period_closed = django.dispatch.Signal()
