"""Estimating an operation's tokens (cached by a hash of the inputs and of the
calibration used), and learning the calibrations from settled operations."""
from __future__ import annotations

import hashlib
import json
import logging
import math
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

from django.conf import settings
from django.core.cache import cache
from django.db import connection, transaction
from django.db.models import Max, Min
from django.db.models.signals import post_delete, post_save
from django.utils import timezone

from ..errors import UnknownProvider

from .. import estimation
from ..models import Calibration, CalibrationCursor, LedgerEntry, OperationType, Provider
from .usage import operation_type_get

logger = logging.getLogger(__name__)

# (model, script class) -> what an estimate would apply; a provider's calibrations.
Calibrations = dict[tuple[str, str], estimation.CalibrationUsed]


def provider_rules(provider: Provider) -> estimation.ProviderRules:
    return estimation.ProviderRules(
        slug=provider.slug, exact=provider.counting == Provider.Counting.EXACT,
        default_encoding=provider.default_encoding, calibration_factor=provider.calibration_factor)


def calibration_pick(calibrations: Calibrations, *, model: str, script: str) -> estimation.CalibrationUsed | None:
    """The calibration an estimate for `model` and `script` applies: the most specific
    one with CALIBRATION_MIN_SAMPLES samples (this model and script, any model and this
    script, this model and any script, any), else the most specific with any, else None
    (the provider's starting factor). Learning asks the same to know the factor a
    settled operation's estimate was made with."""
    levels = [calibrations.get(key) for key in ((model, script), ("", script), (model, ""), ("", ""))]
    found = [c for c in levels if c is not None and c.samples > 0]
    for c in found:
        if c.samples >= estimation.CALIBRATION_MIN_SAMPLES:
            return c
    return found[0] if found else None


_RULES_SQL = (
    f"SELECT o.slug, o.base_tokens, p.slug, p.counting, p.default_encoding, p.calibration_factor "
    f"FROM {OperationType._meta.db_table} o, {Provider._meta.db_table} p "
    f"WHERE o.slug = %s AND o.active AND p.slug = %s AND p.active")

Rules = tuple[str, int, estimation.ProviderRules, Calibrations]

# (operation type, provider) -> (monotonic expiry, rules), per process. A staff change to
# an operation type or provider, or a new calibration, reaches this process at once
# (receivers below) and the others (web processes, when the worker learns) within
# ESTIMATE_RULES_CACHE_SECONDS; unknown names are never kept.
_rules_cache: dict[tuple[str, str], tuple[float, Rules]] = {}
# Bumped by every clear: rules read before one (by another thread) are not kept after it.
_clears = [0]
_clears_lock = threading.Lock()


def rules_cache_clear(**kwargs) -> None:
    with _clears_lock:
        _clears[0] += 1
        _rules_cache.clear()


post_save.connect(rules_cache_clear, sender=OperationType, dispatch_uid="estimate_rules_op_saved")
post_delete.connect(rules_cache_clear, sender=OperationType, dispatch_uid="estimate_rules_op_deleted")
post_save.connect(rules_cache_clear, sender=Provider, dispatch_uid="estimate_rules_provider_saved")
post_delete.connect(rules_cache_clear, sender=Provider, dispatch_uid="estimate_rules_provider_deleted")
post_save.connect(rules_cache_clear, sender=Calibration, dispatch_uid="estimate_rules_calibration_saved")


def _rules_for(operation_type: str, provider: str) -> Rules:
    """The operation type's slug and base cost, the provider's rules and calibrations:
    kept a few seconds, so a cached estimate is a hash and a Redis GET (bench/: under 1 ms)."""
    now = time.monotonic()
    hit = _rules_cache.get((operation_type, provider))
    if hit is not None and hit[0] > now:
        return hit[1]
    clears = _clears[0]
    rules = _rules_from_db(operation_type, provider)
    with _clears_lock:
        if clears != _clears[0]:
            return rules  # read before a change was cleared away: good for this request only
        if len(_rules_cache) > 1000:  # names come from requests: keep the dict small
            _rules_cache.clear()
        _rules_cache[(operation_type, provider)] = (now + settings.ESTIMATE_RULES_CACHE_SECONDS, rules)
    return rules


def _calibrations_of(provider: str) -> Calibrations:
    return {(c.model, c.script_class): estimation.CalibrationUsed(factor=c.factor, samples=c.samples, id=c.pk,
                                                                  version=c.version)
            for c in Calibration.objects.filter(provider=provider, samples__gt=0)}


def _rules_from_db(operation_type: str, provider: str) -> Rules:
    with connection.cursor() as cursor:
        cursor.execute(_RULES_SQL, [operation_type, provider])
        row = cursor.fetchone()
    if row is None:  # say which is unknown, the operation type first
        operation_type_get(operation_type)
        raise UnknownProvider(f"Unknown provider '{provider}'.")
    op_slug, base_tokens, slug, counting, encoding, factor = row
    # A raw row has the driver's types: SQLite hands DECIMAL columns back as floats.
    factor = Provider._meta.get_field("calibration_factor").to_python(factor)
    rules = provider_rules(Provider(slug=slug, counting=counting, default_encoding=encoding,
                                    calibration_factor=factor))
    return op_slug, base_tokens, rules, ({} if rules.exact else _calibrations_of(slug))


def tokens_estimate(*, operation_type: str, provider: str, model: str | None, topic: str,
                    sources: list[str]) -> dict:
    op_slug, base_tokens, rules, calibrations = _rules_for(operation_type, provider)
    # The script picks the calibration, so it is part of the key only through it; an exact
    # count needs it only for the answer (on a miss).
    script = None if rules.exact else estimation.script_class(estimation.content_text(topic, sources))
    calibration = None if script is None else calibration_pick(calibrations, model=model or "", script=script)
    digest = hashlib.blake2b(digest_size=20)
    # The calibration's id and version: a recalibration is used at once, not when the cache expires.
    digest.update(json.dumps([op_slug, base_tokens, rules.slug, rules.exact, rules.default_encoding,
                              str(rules.calibration_factor),
                              [calibration.id, calibration.version] if calibration else None, model or "",
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
                                 cache_dir=settings.TIKTOKEN_CACHE_DIR, calibration=calibration,
                                 script=script).as_dict()
    try:
        cache.set(key, result, settings.ESTIMATE_CACHE_SECONDS)
    except Exception:
        logger.warning("estimate cache unavailable", exc_info=True)
    return {**result, "cached": False}


# --- learning ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class CalibrationRun:
    cursor: int
    samples: int
    calibrations_written: int


def _cursor_locked() -> CalibrationCursor:
    if not CalibrationCursor.objects.filter(pk=1).exists():
        # Start just below the oldest row: the first run learns from the whole ledger.
        oldest = LedgerEntry.objects.aggregate(m=Min("id"))["m"]
        CalibrationCursor.objects.get_or_create(pk=1, defaults={"ledger_id": (oldest or 1) - 1})
    return CalibrationCursor.objects.select_for_update().get(pk=1)


def _learn_levels(provider: str, model: str, script: str) -> list[tuple[str, str, str]]:
    """The calibrations one settled operation teaches: its model's and any model's,
    for its script class ('' when the consume did not say)."""
    return list(dict.fromkeys([(provider, model, script), (provider, "", script)]))


def calibration_learn_batch(*, batch_size: int | None = None, now: datetime | None = None) -> CalibrationRun:
    """Learn from the settled consumptions among the next `batch_size` ledger ids past
    the cursor that carry an estimate, for calibrated providers. A range of ids, not of
    matching rows, so a ledger of OpenAI (exact) consumptions is read once, not rescanned
    every run. One transaction, cursor included: safe to run twice (runs queue on the
    cursor's row lock) and after a crash.

    Each sample's target is the factor its estimate was made with (the calibration
    `calibration_pick` gives as this run starts, or the provider's starting factor)
    times actual / estimated, of the content: the calibration multiplies the content's
    count only, so the operation type's base cost is taken off both figures first (else a
    short text under a 500-token base would teach a factor near 1 whatever its script).
    An operation with no content estimated, or that took no more than its base, teaches
    nothing. Ledger ids become visible at commit, so a consume that
    commits after a higher id was read is not learnt from: a sample fewer, not an
    error."""
    batch_size = batch_size or settings.CALIBRATION_BATCH_SIZE
    now = now or timezone.now()
    with transaction.atomic():
        cursor = _cursor_locked()
        high = min(LedgerEntry.objects.aggregate(m=Max("id"))["m"] or 0, cursor.ledger_id + batch_size)
        priors = {slug: float(factor) for slug, factor in Provider.objects.filter(
            counting=Provider.Counting.CALIBRATED).values_list("slug", "calibration_factor")}
        rows = list(LedgerEntry.objects.filter(
            kind=LedgerEntry.Kind.CONSUMPTION, id__gt=cursor.ledger_id, id__lte=high, provider__in=list(priors),
            estimated_tokens__gt=0, actual_tokens__gt=0,
        ).order_by("id").values_list("id", "provider", "model", "script_class", "operation_type",
                                     "estimated_tokens", "actual_tokens"))
        bases = dict(OperationType.objects.values_list("slug", "base_tokens"))
        rows = [(provider, model, script, estimated - base, actual - base)
                for _, provider, model, script, op_type, estimated, actual in rows
                for base in [bases.get(op_type, 0)] if estimated > base and actual > base]
        stored = {(c.provider, c.model, c.script_class): c for c in
                  Calibration.objects.select_for_update().filter(provider__in={r[0] for r in rows})}
        as_started: dict[str, Calibrations] = {}
        for (provider, model, script), c in stored.items():
            as_started.setdefault(provider, {})[(model, script)] = estimation.CalibrationUsed(
                factor=c.factor, samples=c.samples, id=c.pk, version=c.version)
        states = {key: estimation.LearnState(log_factor=c.log_factor, deviation=c.deviation, samples=c.samples,
                                             error=None if c.recent_error is None else float(c.recent_error))
                  for key, c in stored.items()}
        changed: set[tuple[str, str, str]] = set()
        for provider, model, script, estimated, actual in rows:
            used = calibration_pick(as_started.get(provider, {}), model=model, script=script)
            factor_used = float(used.factor) if used else priors[provider]
            for key in _learn_levels(provider, model, script):
                state = states.get(key) or estimation.LearnState(log_factor=math.log(priors[provider]))
                states[key] = estimation.calibration_learn(state, estimated=estimated, actual=actual,
                                                           factor_used=factor_used)
                changed.add(key)
        for key in changed:
            state = states[key]
            values = {"factor": Decimal(state.factor).quantize(Decimal("0.00001")), "log_factor": state.log_factor,
                      "deviation": state.deviation, "samples": state.samples, "updated_at": now,
                      "recent_error": None if state.error is None else Decimal(state.error).quantize(Decimal("0.00001"))}
            calibration = stored.get(key)
            if calibration is None:
                calibration = Calibration(provider=key[0], model=key[1], script_class=key[2], version=1, **values)
            else:
                for name, value in values.items():
                    setattr(calibration, name, value)
                calibration.version += 1
            calibration.full_clean()
            calibration.save()
        cursor.ledger_id = max(cursor.ledger_id, high)
        cursor.ran_at = now
        cursor.save(update_fields=["ledger_id", "ran_at"])
    return CalibrationRun(cursor.ledger_id, len(rows), len(changed))


def calibration_learn_run(*, batch_size: int | None = None, max_batches: int = 100,
                          now: datetime | None = None) -> CalibrationRun:
    """Learn from everything settled since the last run, batch by batch (each commits)."""
    samples = written = 0
    run = CalibrationRun(0, 0, 0)
    for _ in range(max_batches):
        run = calibration_learn_batch(batch_size=batch_size, now=now)
        samples += run.samples
        written += run.calibrations_written
        if run.cursor >= (LedgerEntry.objects.aggregate(m=Max("id"))["m"] or 0):
            break
    return CalibrationRun(run.cursor, samples, written)
