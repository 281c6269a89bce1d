"""Accounts with a live subscription can pay: their overage room stays as it was when
metering learned to give overage only to accounts that can pay (metering 0009)."""
from django.db import migrations

LIVE = ("active", "trialing", "past_due")


def mark_paying(apps, schema_editor):
    Account = apps.get_model("metering", "Account")
    BillingAccount = apps.get_model("billing", "BillingAccount")
    paying = BillingAccount.objects.filter(subscription_status__in=LIVE).values_list("account_id", flat=True)
    Account.objects.filter(pk__in=list(paying)).update(can_pay=True)


class Migration(migrations.Migration):
    dependencies = [
        ("billing", "0002_subscription_periods"),
        ("metering", "0009_account_can_pay_live_holds"),
    ]

    operations = [migrations.RunPython(mark_paying, migrations.RunPython.noop)]
