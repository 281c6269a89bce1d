"""The seed's tiers, operation types and providers. Staff edit them in admin afterwards."""
from decimal import Decimal

from django.db import migrations

TIERS = [
    dict(slug="basic", name="Basic", monthly_token_limit=10_000, overage_rate=Decimal("0.001"), allow_overage=True,
         max_overage_percentage=50, hard_limit=False, requests_per_hour=100, monthly_price_cents=1900,
         yearly_price_cents=19000, features=["Basic consensus analysis", "PDF reports"]),
    dict(slug="pro", name="Pro", monthly_token_limit=50_000, overage_rate=Decimal("0.001"), allow_overage=True,
         max_overage_percentage=100, hard_limit=False, requests_per_hour=500, monthly_price_cents=4900,
         yearly_price_cents=49000, features=["Advanced analysis", "Priority processing", "Email reports"]),
    dict(slug="enterprise", name="Enterprise", monthly_token_limit=200_000, overage_rate=Decimal("0.0008"),
         allow_overage=True, max_overage_percentage=200, hard_limit=False, requests_per_hour=1000,
         monthly_price_cents=19900, yearly_price_cents=199000,
         features=["Premium analysis", "Custom integrations", "SLA"]),
]
OPERATIONS = [("consensus", "Consensus", 500), ("analysis", "Analysis", 200), ("summary", "Summary", 100),
              ("comparison", "Comparison", 300)]
PROVIDERS = [
    dict(slug="openai", name="OpenAI", counting="exact", default_encoding="o200k_base", chars_per_token=Decimal("4"),
         words_per_token=Decimal("0.75")),
    dict(slug="anthropic", name="Anthropic", counting="calibrated", default_encoding="cl100k_base",
         chars_per_token=Decimal("3.5"), words_per_token=Decimal("0.7"),
         calibration_factor=Decimal("1.15")),  # the same start as 0010 sets (a re-seed in the tests)
]


def seed(apps, schema_editor):
    Tier = apps.get_model("metering", "Tier")
    OperationType = apps.get_model("metering", "OperationType")
    Provider = apps.get_model("metering", "Provider")
    for tier in TIERS:
        Tier.objects.update_or_create(slug=tier["slug"], defaults=tier)
    for slug, name, base in OPERATIONS:
        OperationType.objects.update_or_create(slug=slug, defaults={"name": name, "base_tokens": base})
    # The tests re-seed with today's models: 0010 dropped the chars/words ratios.
    fields = {f.name for f in Provider._meta.get_fields()}
    for provider in PROVIDERS:
        Provider.objects.update_or_create(slug=provider["slug"],
                                          defaults={k: v for k, v in provider.items() if k in fields})


class Migration(migrations.Migration):
    dependencies = [("metering", "0001_initial")]
    operations = [migrations.RunPython(seed, migrations.RunPython.noop)]
