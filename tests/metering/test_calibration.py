"""Estimates that learn from settled operations (issue 16): script classes, the robust
learning, the job over real ledger rows, the estimate's cache key, and what staff see."""
from __future__ import annotations

import math
from decimal import Decimal
from fractions import Fraction
from pathlib import Path

import pytest
from django.conf import settings
from django.test import Client
from prometheus_client.parser import text_string_to_metric_families

from metering import estimation
from metering.models import Calibration, CalibrationCursor, LedgerEntry, Provider
from metering.schedule import periodic_jobs
from metering.services import calibration_learn_run
from metering.tasks import calibration_learn_task

from .conftest import consume_body
from .test_estimation import CJK, CYRILLIC, ENGLISH, reference_count

CODE = '''def period_for(account, now):
    """The open period, if any."""
    for period in account.periods.filter(starts_at__lte=now).order_by("-starts_at")[:1]:
        return period if period.ends_at > now else None
    return {"used": 0, "limit": [1, 2, 3]}
'''


def estimate(api, user, text: str, *, model: str = "claude-sonnet-4", provider: str = "anthropic") -> dict:
    response = api.post("/api/tokens/estimate", {"userId": user.pk, "operationType": "summary", "provider": provider,
                                                 "model": model, "topic": text}, format="json")
    assert response.status_code == 200, response.content
    return response.json()


def settle(api, user, prefix: str, count: int, *, estimated: int, actual: int, script: str = "cjk",
           model: str = "claude-sonnet-4", provider: str = "anthropic") -> None:
    ops = [consume_body(user, f"{prefix}-{i}", actual, provider=provider, model=model, estimatedTokens=estimated,
                        scriptClass=script) for i in range(count)]
    response = api.post("/api/tokens/consume/batch", {"operations": ops}, format="json")
    assert response.status_code == 201, response.content


# --- script classes ----------------------------------------------------------------------------------

@pytest.mark.parametrize("text,expected", [
    (ENGLISH, "latin"), ("Große Straße, déjà vu, café crème.", "latin"), (CODE, "code"), (CYRILLIC, "cyrillic"),
    (CJK, "cjk"), ("東京の天気は晴れです。", "cjk"), ("한국어 문장입니다", "cjk"), ("Ελληνικά κείμενα εδώ", "other"),
    ("{}[]();", "code"), ("", "other"), ("12345 678", "other"),
    (ENGLISH * 400 + CJK * 40, "cjk"),  # a long text is sampled across its whole length
])
def test_script_class(text, expected):
    assert estimation.script_class(text) == expected


CORPUS = Path(__file__).resolve().parents[2] / "bench" / "corpus"


@pytest.mark.parametrize("name,expected", [("english", "latin"), ("code", "code"), ("cyrillic", "cyrillic"),
                                           ("cjk", "cjk")])
def test_every_text_of_the_benchmark_corpus_is_told_apart(name, expected):
    text = (CORPUS / f"{name}.txt").read_text()
    units = text.split("\n####\n")[1:] if name == "code" else text.splitlines()
    assert {estimation.script_class(unit) for unit in units if unit.strip()} == {expected}


def test_a_long_text_is_told_from_an_even_sample_of_it():
    """It runs on every estimate, cached ones included: it reads at most SCRIPT_SAMPLE_CHARS characters
    taken evenly across the text, whatever its length (its cost is in bench/estimate.py's cached figure)."""
    text = ("The committee reviewed the figures. " * 3000 + CJK * 100)[:200_000]
    sample = text[::len(text) // estimation.SCRIPT_SAMPLE_CHARS]
    assert len(sample) <= 2 * estimation.SCRIPT_SAMPLE_CHARS
    assert estimation.script_class(text) == estimation.script_class(sample) == "cjk"  # 88,000 of its characters are CJK


# --- the learning itself -----------------------------------------------------------------------------

def learn(state: estimation.LearnState, ratios: list[float], factor_used: float | None = None,
          base: int = 1000) -> estimation.LearnState:
    """Settlements whose estimates were made with the state's own factor (or `factor_used`)."""
    for ratio in ratios:
        used = factor_used if factor_used is not None else state.factor
        estimated = math.ceil(base * used)
        state = estimation.calibration_learn(state, estimated=estimated, actual=round(base * ratio),
                                             factor_used=used)
    return state


def test_the_learning_converges_within_tens_of_samples():
    ratios = [0.6 * (1 + 0.04 * math.sin(i * 1.7)) for i in range(40)]  # about 0.6, +-4%
    state = learn(estimation.LearnState(), ratios[:10])
    assert abs(state.factor / 0.6 - 1) < 0.03
    state = learn(state, ratios[10:])
    assert abs(state.factor / 0.6 - 1) < 0.02 and state.samples == 40
    assert state.error is not None and state.error < 0.1


def test_an_outlier_barely_moves_a_calibration():
    state = learn(estimation.LearnState(), [1.3 + 0.01 * (i % 3) for i in range(30)])
    for wild in (100.0, 0.01):
        moved = learn(state, [wild], factor_used=state.factor)
        assert abs(moved.factor / state.factor - 1) < 0.02, wild


def test_a_tokenizer_change_is_followed():
    state = learn(estimation.LearnState(), [1.0] * 100)
    state = learn(state, [1.25] * 100)
    assert abs(state.factor / 1.25 - 1) < 0.03


def test_each_sample_is_read_against_the_factor_its_estimate_used():
    """Estimated with 0.5 and 10% low: the right factor is 0.55, whatever the state says."""
    state = estimation.calibration_learn(estimation.LearnState(), estimated=500, actual=550, factor_used=0.5)
    assert state.factor == pytest.approx(0.55)


# --- the job, from real ledger rows ----------------------------------------------------------------

@pytest.mark.django_db
def test_the_job_calibrates_from_ledger_rows_and_estimates_change_at_once(api, make_user):
    user = make_user("enterprise")
    prior = Provider.objects.get(slug="anthropic").calibration_factor
    counted = reference_count("cl100k_base", CJK)
    before = estimate(api, user, CJK)
    assert (before["method"], before["scriptClass"], before["calibrationSamples"]) == ("calibrated", "cjk", 0)
    assert before["breakdown"]["content"] == math.ceil(Fraction(counted) * Fraction(prior))
    assert estimate(api, user, CJK)["cached"] is True

    # 30 CJK operations' content took 30% less than estimated (summary's base of 100 is no part of the
    # calibration: 1,100 - 100 estimated, 800 - 100 taken); one other provider's and one without an estimate
    # are ignored
    settle(api, user, "cjk", 30, estimated=1_100, actual=800)
    api.post("/api/tokens/consume", consume_body(user, "openai", 500, provider="openai", estimatedTokens=100,
                                                 scriptClass="cjk"), format="json")
    api.post("/api/tokens/consume", consume_body(user, "bare", 500, provider="anthropic"), format="json")
    assert set(LedgerEntry.objects.filter(operation_id__startswith="cjk")
               .values_list("script_class", flat=True)) == {"cjk"}  # the batch statement
    assert LedgerEntry.objects.get(operation_id="openai").script_class == "cjk"  # the single one

    assert calibration_learn_task.delay().get() == {
        "cursor": LedgerEntry.objects.order_by("-id").first().pk, "samples": 30, "calibrationsWritten": 2}
    learnt = Calibration.objects.get(provider="anthropic", model="claude-sonnet-4", script_class="cjk")
    assert learnt.factor == Decimal("0.70000") * prior and learnt.samples == 30 and learnt.version == 1
    assert learnt.recent_error == Decimal("0.42857")  # |1000 - 700| / 700: the content estimates made
    assert Calibration.objects.get(provider="anthropic", model="", script_class="cjk").samples == 30
    assert not Calibration.objects.filter(provider="openai").exists()

    after = estimate(api, user, CJK)
    assert after["cached"] is False  # the calibration's version is part of the cache key
    assert (after["method"], after["calibrationSamples"]) == ("calibrated", 30)
    assert after["breakdown"]["content"] == math.ceil(Fraction(counted) * Fraction(learnt.factor))
    # other scripts keep the starting factor; another model of the provider uses the any-model calibration
    assert estimate(api, user, ENGLISH)["calibrationSamples"] == 0
    assert estimate(api, user, CJK, model="claude-haiku-4")["calibrationSamples"] == 30

    # run again: nothing new, nothing changes
    assert calibration_learn_run().samples == 0
    assert Calibration.objects.get(pk=learnt.pk).version == 1
    assert estimate(api, user, CJK)["cached"] is True


@pytest.mark.django_db
def test_one_wild_settlement_does_not_move_the_calibration_much(api, make_user):
    user = make_user("enterprise")
    settle(api, user, "steady", 40, estimated=1_000, actual=1_200, script="cyrillic")
    calibration_learn_run()
    steady = Calibration.objects.get(provider="anthropic", model="claude-sonnet-4", script_class="cyrillic")
    estimated = math.ceil(1_000 * steady.factor)
    settle(api, user, "wild", 1, estimated=estimated, actual=estimated * 20, script="cyrillic")
    calibration_learn_run()
    moved = Calibration.objects.get(pk=steady.pk)
    assert moved.samples == 41 and moved.version == steady.version + 1
    assert abs(moved.factor / steady.factor - 1) < Decimal("0.02")


@pytest.mark.django_db
def test_consumes_without_a_script_class_teach_the_any_script_calibration(api, make_user, settings):
    settings.METERING_FAST_PATH = False  # the ORM path writes the ledger row this time
    user = make_user("enterprise")
    settle(api, user, "plain", 12, estimated=200, actual=250, script="", model="")  # content 100 -> 150
    hold = api.post("/api/tokens/check", {"userId": user.pk, "tokens": 100, "reserve": True, "operationId": "held"},
                    format="json").json()
    api.post("/api/tokens/consume", consume_body(user, "held", 220, provider="anthropic", estimatedTokens=200,
                                                 reservationId=hold["reservationId"], scriptClass="latin"),
             format="json")
    assert LedgerEntry.objects.get(operation_id="held", kind="consumption").script_class == "latin"
    calibration_learn_run(batch_size=5)  # in batches of ids, each with its cursor
    assert dict(Calibration.objects.values_list("script_class", "samples")) == {"": 12, "latin": 1}
    assert CalibrationCursor.objects.get().ledger_id == LedgerEntry.objects.order_by("-id").first().pk
    text = ENGLISH * 3
    # latin has 1 sample, below the minimum: the any-script calibration (12) applies
    assert estimate(api, user, text, model="")["calibrationSamples"] == 12


@pytest.mark.django_db
def test_the_base_cost_is_no_part_of_what_the_calibration_learns(api, make_user):
    """Consensus has a base of 500: a short CJK text whose content took twice its estimate teaches a factor of
    two, not 600 / 550; an operation that took no more than its base teaches nothing."""
    user = make_user("enterprise")
    prior = Provider.objects.get(slug="anthropic").calibration_factor
    ops = [consume_body(user, f"short-{i}", 600, operation_type="consensus", provider="anthropic",
                        model="claude-sonnet-4", estimatedTokens=550, scriptClass="cjk") for i in range(20)]
    ops.append(consume_body(user, "tiny", 450, operation_type="consensus", provider="anthropic",
                            model="claude-sonnet-4", estimatedTokens=550, scriptClass="cjk"))
    assert api.post("/api/tokens/consume/batch", {"operations": ops}, format="json").status_code == 201
    assert calibration_learn_run().samples == 20
    learnt = Calibration.objects.get(provider="anthropic", model="claude-sonnet-4", script_class="cjk")
    assert learnt.factor == Decimal("2.00000") * prior and learnt.samples == 20


@pytest.mark.django_db
def test_the_cursor_passes_rows_that_teach_nothing(api, make_user):
    """OpenAI (exact) consumptions are read once and passed, not looked at again every minute."""
    user = make_user("enterprise")
    settle(api, user, "exact", 7, estimated=100, actual=120, provider="openai", model="gpt-4o")
    run = calibration_learn_run(batch_size=3)
    assert (run.samples, run.calibrations_written) == (0, 0)
    assert run.cursor == CalibrationCursor.objects.get().ledger_id == LedgerEntry.objects.order_by("-id").first().pk
    assert not Calibration.objects.exists()


@pytest.mark.django_db
def test_a_script_class_outside_the_list_is_refused(api, make_user):
    user = make_user()
    for bad in ("klingon", "CJK", 1, None):
        response = api.post("/api/tokens/consume", consume_body(user, "x", 10, scriptClass=bad), format="json")
        assert response.status_code == 400, (bad, response.content)
        assert "scriptClass" in response.content.decode()
    assert not LedgerEntry.objects.filter(operation_id="x").exists()


@pytest.mark.django_db
def test_the_script_class_is_not_part_of_the_replay_check(api, make_user):
    user = make_user()
    first = api.post("/api/tokens/consume", consume_body(user, "op", 10, scriptClass="cjk"), format="json")
    again = api.post("/api/tokens/consume", consume_body(user, "op", 10, scriptClass="latin"), format="json")
    assert (first.status_code, again.status_code) == (201, 200)
    assert LedgerEntry.objects.get(operation_id="op").script_class == "cjk"


# --- what staff see ------------------------------------------------------------------------------------

@pytest.mark.django_db
def test_staff_see_calibrations_in_admin_and_prometheus(api, make_user, admin_client):
    user = make_user("enterprise")
    settle(api, user, "a", 20, estimated=200, actual=210, script="latin")
    settle(api, user, "b", 10, estimated=200, actual=180, script="cjk")
    calibration_learn_run()
    page = admin_client.get("/admin/metering/calibration/")
    assert page.status_code == 200
    body = page.content.decode()
    assert "claude-sonnet-4" in body and "cjk" in body and "9.1%" in body  # |100 - 110| / 110
    assert admin_client.get("/admin/metering/calibration/add/").status_code == 403

    metrics = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(Client().get("/metrics").content.decode())
               for s in family.samples}
    assert metrics[("ct_estimate_calibration_samples", (("provider", "anthropic"),))] == 30
    error = metrics[("ct_estimate_error_ratio", (("provider", "anthropic"),))]
    assert error == pytest.approx((20 * 10 / 110 + 10 * 20 / 80) / 30, abs=1e-4)


def test_the_job_is_scheduled_every_minute():
    job = next(j for j in periodic_jobs() if j.task == "metering.calibration_learn")
    assert job.every_seconds == 60 and settings.CALIBRATION_BATCH_SIZE > 0
