"""Estimating an operation's tokens, cached by a hash of the inputs."""
from __future__ import annotations

import hashlib
import json
import logging
import time
from decimal import Decimal

from django.conf import settings
from django.core.cache import cache
from django.db import connection, transaction
from django.db.models import Sum
from django.db.models.signals import post_delete, post_save
from django.utils import timezone

from ..errors import UnknownProvider

from .. import estimation
from ..models import LedgerEntry, OperationType, Provider
from .usage import operation_type_get

logger = logging.getLogger(__name__)

# How far one calibration run may move a provider's factor, and its bounds.
CALIBRATION_STEP_LIMIT = Decimal("2")
CALIBRATION_BOUNDS = (Decimal("0.2"), Decimal("5"))


def provider_rules(provider: Provider) -> estimation.ProviderRules:
    return estimation.ProviderRules(
        slug=provider.slug, exact=provider.counting == Provider.Counting.EXACT,
        default_encoding=provider.default_encoding, chars_per_token=provider.chars_per_token,
        words_per_token=provider.words_per_token, calibration_factor=provider.calibration_factor,
        calibration_samples=provider.calibration_samples)


_RULES_SQL = (
    f"SELECT o.slug, o.base_tokens, p.slug, p.counting, p.default_encoding, p.chars_per_token, p.words_per_token, "
    f"p.calibration_factor, p.calibration_samples FROM {OperationType._meta.db_table} o, {Provider._meta.db_table} p "
    f"WHERE o.slug = %s AND o.active AND p.slug = %s AND p.active")


# (operation type, provider) -> (monotonic expiry, rules), per process. A staff change to
# an operation type or provider reaches this process at once (receivers below) and the
# others within ESTIMATE_RULES_CACHE_SECONDS; unknown names are never kept.
_rules_cache: dict[tuple[str, str], tuple[float, tuple[str, int, estimation.ProviderRules]]] = {}


def rules_cache_clear(**kwargs) -> None:
    _rules_cache.clear()


post_save.connect(rules_cache_clear, sender=OperationType, dispatch_uid="estimate_rules_op_saved")
post_delete.connect(rules_cache_clear, sender=OperationType, dispatch_uid="estimate_rules_op_deleted")
post_save.connect(rules_cache_clear, sender=Provider, dispatch_uid="estimate_rules_provider_saved")
post_delete.connect(rules_cache_clear, sender=Provider, dispatch_uid="estimate_rules_provider_deleted")


def _rules_for(operation_type: str, provider: str) -> tuple[str, int, estimation.ProviderRules]:
    """The operation type's slug and base cost and the provider's rules: one plain query,
    kept a few seconds, so a cached estimate is a hash and a Redis GET (bench/: under 1 ms)."""
    now = time.monotonic()
    hit = _rules_cache.get((operation_type, provider))
    if hit is not None and hit[0] > now:
        return hit[1]
    rules = _rules_from_db(operation_type, provider)
    if len(_rules_cache) > 1000:  # names come from requests: keep the dict small
        _rules_cache.clear()
    _rules_cache[(operation_type, provider)] = (now + settings.ESTIMATE_RULES_CACHE_SECONDS, rules)
    return rules


def _rules_from_db(operation_type: str, provider: str) -> tuple[str, int, estimation.ProviderRules]:
    with connection.cursor() as cursor:
        cursor.execute(_RULES_SQL, [operation_type, provider])
        row = cursor.fetchone()
    if row is None:  # say which is unknown, the operation type first
        operation_type_get(operation_type)
        raise UnknownProvider(f"Unknown provider '{provider}'.")
    op_slug, base_tokens, slug, counting, encoding, chars, words, factor, samples = row
    # A raw row has the driver's types: SQLite hands DECIMAL columns back as floats.
    chars, words, factor = (Provider._meta.get_field(name).to_python(value) for name, value in
                            (("chars_per_token", chars), ("words_per_token", words), ("calibration_factor", factor)))
    return op_slug, base_tokens, provider_rules(Provider(
        slug=slug, counting=counting, default_encoding=encoding, chars_per_token=chars, words_per_token=words,
        calibration_factor=factor, calibration_samples=samples))


def tokens_estimate(*, operation_type: str, provider: str, model: str | None, topic: str,
                    sources: list[str]) -> dict:
    op_slug, base_tokens, rules = _rules_for(operation_type, provider)
    digest = hashlib.blake2b(digest_size=20)
    digest.update(json.dumps([op_slug, base_tokens, rules.slug, rules.exact, rules.default_encoding,
                              str(rules.chars_per_token), str(rules.words_per_token), str(rules.calibration_factor),
                              rules.calibration_samples >= estimation.CALIBRATION_MIN_SAMPLES, model or "",
                              len(sources)]).encode())
    for part in (topic, *sources):
        digest.update(len(part).to_bytes(8, "little"))
        digest.update(part.encode("utf-8", "surrogatepass"))
    key = f"estimate:{digest.hexdigest()}"
    try:
        cached = cache.get(key)
    except Exception:  # the cache is an optimisation: Redis down means compute
        logger.warning("estimate cache unavailable", exc_info=True)
        cached = None
    if cached is not None:
        return {**cached, "cached": True}
    result = estimation.estimate(base_tokens=base_tokens, rules=rules, model=model, topic=topic, sources=sources,
                                 cache_dir=settings.TIKTOKEN_CACHE_DIR).as_dict()
    try:
        cache.set(key, result, settings.ESTIMATE_CACHE_SECONDS)
    except Exception:
        logger.warning("estimate cache unavailable", exc_info=True)
    return {**result, "cached": False}


def provider_calibrate(*, provider: Provider) -> Provider:
    """Learn the provider's factor from operations settled since the last run: the
    factor is scaled by Σactual / Σestimated, and the mean relative error kept."""
    with transaction.atomic():
        locked = Provider.objects.select_for_update().get(pk=provider.pk)
        if locked.counting == Provider.Counting.EXACT:
            return locked
        rows = LedgerEntry.objects.filter(kind=LedgerEntry.Kind.CONSUMPTION, provider=locked.slug,
                                          estimated_tokens__gt=0, actual_tokens__gt=0)
        if locked.calibrated_at:
            rows = rows.filter(created_at__gt=locked.calibrated_at)
        totals = rows.aggregate(estimated=Sum("estimated_tokens"), actual=Sum("actual_tokens"))
        pairs = list(rows.values_list("estimated_tokens", "actual_tokens")[:5000])
        locked.calibrated_at = timezone.now()
        if pairs:
            ratio = Decimal(totals["actual"]) / Decimal(totals["estimated"])
            ratio = min(max(ratio, 1 / CALIBRATION_STEP_LIMIT), CALIBRATION_STEP_LIMIT)
            low, high = CALIBRATION_BOUNDS
            locked.calibration_factor = min(max(locked.calibration_factor * ratio, low), high).quantize(Decimal("0.00001"))
            locked.calibration_samples += len(pairs)
            locked.recent_error = (sum(Decimal(abs(a - e)) / Decimal(a) for e, a in pairs) / len(pairs)).quantize(
                Decimal("0.00001"))
        locked.save(update_fields=["calibration_factor", "calibration_samples", "recent_error", "calibrated_at"])
    return locked
