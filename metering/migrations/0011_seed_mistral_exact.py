"""Mistral counts exactly: its Tekken tokenizer ships in mistral-common (metering/encodings.py)."""
from django.db import migrations

PROVIDERS = [dict(slug="mistral", name="Mistral", counting="exact", default_encoding="tekken_240911")]


def seed(apps, schema_editor):
    Provider = apps.get_model("metering", "Provider")
    for provider in PROVIDERS:
        # A provider staff added already under this slug keeps its name and active flag.
        Provider.objects.update_or_create(slug=provider["slug"], defaults={
            "counting": provider["counting"], "default_encoding": provider["default_encoding"]},
            create_defaults=provider)


class Migration(migrations.Migration):
    dependencies = [("metering", "0010_estimate_calibrations")]
    operations = [migrations.RunPython(seed, migrations.RunPython.noop)]
