"""Fewer index writes per consume: the ledger's and audit log's service-key indexes
(no query filters by key; keys are revoked, never deleted), the usage period's
account index (period_unique_start leads with the account), and the ledger's
reservation index, which held a NULL for every row without a reservation and now
holds only the rows that have one.

Only the indexes change in the database: AlterField on a foreign key would also
drop and re-create (and re-validate, over the whole ledger) its constraint."""
import django.db.models.deletion
from django.db import migrations, models


def _drop(table: str, column: str, name: str) -> migrations.RunSQL:
    return migrations.RunSQL(f'DROP INDEX IF EXISTS "{name}"',
                             reverse_sql=f'CREATE INDEX IF NOT EXISTS "{name}" ON "{table}" ("{column}")')


class Migration(migrations.Migration):

    dependencies = [
        ('metering', '0005_drop_covered_indexes'),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(
            state_operations=[
                migrations.AlterField(
                    model_name='auditlog',
                    name='service_key',
                    field=models.ForeignKey(blank=True, db_index=False, null=True, on_delete=django.db.models.deletion.SET_NULL, related_name='+', to='metering.servicekey'),
                ),
                migrations.AlterField(
                    model_name='ledgerentry',
                    name='reservation',
                    field=models.ForeignKey(blank=True, db_index=False, null=True, on_delete=django.db.models.deletion.PROTECT, related_name='+', to='metering.reservation'),
                ),
                migrations.AlterField(
                    model_name='ledgerentry',
                    name='service_key',
                    field=models.ForeignKey(blank=True, db_index=False, null=True, on_delete=django.db.models.deletion.PROTECT, related_name='+', to='metering.servicekey'),
                ),
                migrations.AlterField(
                    model_name='usageperiod',
                    name='account',
                    field=models.ForeignKey(db_index=False, on_delete=django.db.models.deletion.CASCADE, related_name='periods', to='metering.account'),
                ),
            ],
            database_operations=[
                _drop("metering_auditlog", "service_key_id", "metering_auditlog_service_key_id_ea348067"),
                _drop("metering_ledgerentry", "service_key_id", "metering_ledgerentry_service_key_id_5461c9af"),
                _drop("metering_ledgerentry", "reservation_id", "metering_ledgerentry_reservation_id_3bd31ece"),
                _drop("metering_usageperiod", "account_id", "metering_usageperiod_account_id_4b3194ec"),
            ],
        ),
        migrations.AddIndex(
            model_name='ledgerentry',
            index=models.Index(condition=models.Q(('reservation__isnull', False)), fields=['reservation'], name='ledger_reservation'),
        ),
    ]
