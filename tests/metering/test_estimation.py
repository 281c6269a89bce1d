"""Estimation: exact tiktoken counts for OpenAI models, the encoding times a factor for
other providers, offline encodings, and the estimate cache (learning: test_calibration.py)."""
from __future__ import annotations

import hashlib
import math
import os
import subprocess
import sys
import textwrap
from decimal import Decimal
from fractions import Fraction
from pathlib import Path

import pytest
import redis
import tiktoken
from django.conf import settings

from metering import estimation
from metering.encodings import seed_cache, tekken_path

ROOT = Path(__file__).resolve().parents[2]
ENGLISH = ("The committee reviewed three independent analyses of the quarterly figures and found that, "
           "despite minor disagreements about seasonal adjustment, all of them pointed to steady growth. ")
CJK = "多个模型对同一问题给出答案后，系统会比较它们的推理过程并找出共识。" * 20 + "東京の天気は晴れです。" * 20
CYRILLIC = "Несколько моделей отвечают на один и тот же вопрос, а система ищет согласие между ними. " * 10
OPENAI_MODELS = [("gpt-4o", "o200k_base"), ("gpt-4o-mini", "o200k_base"), ("gpt-4.1", "o200k_base"),
                 ("gpt-4.1-mini", "o200k_base"), ("o3", "o200k_base"), ("o1", "o200k_base"),
                 ("gpt-4", "cl100k_base"), ("gpt-4-0613", "cl100k_base"), ("gpt-3.5-turbo", "cl100k_base"),
                 (None, "o200k_base"), ("some-future-model", "o200k_base")]
TIKTOKEN_URLS = {"cl100k_base": "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken",
                 "o200k_base": "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken"}
TIKTOKEN_HASHES = {"cl100k_base": "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
                   "o200k_base": "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"}

ANTHROPIC = estimation.ProviderRules(slug="anthropic", exact=False, default_encoding="cl100k_base",
                                     calibration_factor=Decimal("1.1"))


def reference_count(encoding: str, text: str) -> int:
    """tiktoken itself (the files were put in its cache by the app; tiktoken checks their hash)."""
    estimation.get_encoding(encoding, settings.TIKTOKEN_CACHE_DIR)
    return len(tiktoken.get_encoding(encoding).encode_ordinary(text))


def mistral_count(text: str, name: str = "tekken_240911") -> int:
    """Mistral's own tokenizer class (mistral-common), from the file it ships."""
    from mistral_common.tokens.tokenizers.tekken import Tekkenizer

    return len(Tekkenizer.from_file(str(tekken_path(name))).encode(text, bos=False, eos=False))


def estimate_body(user, **overrides) -> dict:
    return {"userId": user.pk, "operationType": "summary", "provider": "openai", "topic": ENGLISH,
            "sources": [CYRILLIC, "short source"], **overrides}


@pytest.mark.django_db
@pytest.mark.parametrize("model,encoding", OPENAI_MODELS)
def test_openai_counts_exactly_with_the_models_encoding(api, make_user, model, encoding):
    user = make_user()
    body = estimate_body(user, **({"model": model} if model else {}))
    response = api.post("/api/tokens/estimate", body, format="json")
    assert response.status_code == 200, response.content
    result = response.json()
    text = "\n".join([ENGLISH, CYRILLIC, "short source"])
    expected = reference_count(encoding, text)
    if model and model != "some-future-model":  # an unknown model falls back to the provider's default
        assert tiktoken.encoding_name_for_model(model) == encoding
    assert result["encoding"] == encoding
    assert result["breakdown"] == {"base": 100, "content": expected}
    assert result["tokens"] == 100 + expected
    assert (result["provider"], result["method"], result["cached"]) == ("openai", "exact", False)
    assert (result["scriptClass"], result["calibrationSamples"]) == ("cyrillic", 0)  # most of the letters


@pytest.mark.django_db
@pytest.mark.parametrize("model", ["mistral-small-latest", "mistral-large-2411", None, "gpt-4o"])
def test_mistral_counts_exactly_with_its_tekken_tokenizer(api, make_user, model):
    """The encoding is built from the file mistral-common ships; Mistral's own class counts the same."""
    user = make_user()
    body = estimate_body(user, provider="mistral", topic=ENGLISH + CJK, sources=[CYRILLIC, "def f(x):\n    return x"],
                         **({"model": model} if model else {}))
    result = api.post("/api/tokens/estimate", body, format="json").json()
    expected = mistral_count("\n".join([ENGLISH + CJK, CYRILLIC, "def f(x):\n    return x"]))
    assert result["breakdown"] == {"base": 100, "content": expected}
    assert (result["encoding"], result["method"], result["calibrationSamples"]) == ("tekken_240911", "exact", 0)


@pytest.mark.parametrize("name", ["tekken_240911", "tekken_240718"])
def test_both_shipped_tekken_tokenizers_count_as_mistral_does(name):
    for text in (ENGLISH, CJK, CYRILLIC, "  spaces\t\ttabs\n\nand 12345 numbers 3.14159 ", "émoji 🙂 ok"):
        assert len(estimation.get_encoding(name, settings.TIKTOKEN_CACHE_DIR).encode_ordinary(text)) == \
            mistral_count(text, name)


def test_the_two_encodings_really_differ_on_this_text():
    text = "\n".join([ENGLISH, CYRILLIC, CJK])
    assert reference_count("o200k_base", text) != reference_count("cl100k_base", text)


@pytest.mark.django_db
@pytest.mark.parametrize("operation_type,base", [("consensus", 500), ("analysis", 200), ("summary", 100),
                                                  ("comparison", 300)])
def test_base_cost_per_operation_type(api, make_user, operation_type, base):
    user = make_user()
    empty = api.post("/api/tokens/estimate", estimate_body(user, operationType=operation_type, topic="", sources=[]),
                     format="json").json()
    assert empty["tokens"] == base and empty["breakdown"] == {"base": base, "content": 0}
    full = api.post("/api/tokens/estimate", estimate_body(user, operationType=operation_type, topic="hello world"),
                    format="json").json()
    assert full["breakdown"]["base"] == base and full["tokens"] == base + full["breakdown"]["content"]


@pytest.mark.django_db
def test_a_staff_change_to_an_operation_type_applies_to_the_next_estimate(api, make_user, settings):
    """Workers keep estimation rules a few seconds; a change saved in this process applies at once."""
    from metering.models import OperationType

    settings.ESTIMATE_RULES_CACHE_SECONDS = 3600
    user = make_user()
    body = estimate_body(user, operationType="summary", topic="", sources=[])
    assert api.post("/api/tokens/estimate", body, format="json").json()["tokens"] == 100
    summary = OperationType.objects.get(slug="summary")
    summary.base_tokens = 150
    summary.save()
    assert api.post("/api/tokens/estimate", body, format="json").json()["tokens"] == 150
    summary.active = False
    summary.save()
    refused = api.post("/api/tokens/estimate", body, format="json")
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "unknown_operation_type"


@pytest.mark.parametrize("text", [ENGLISH * 5, "a " * 1000, CJK, CYRILLIC], ids=["english", "words", "cjk",
                                                                              "cyrillic"])
def test_uncalibrated_providers_count_with_the_encoding_times_their_starting_factor(text):
    """No chars or words floor: tiktoken sees the script (a chars ratio alone is far low on CJK)."""
    result = estimation.estimate(base_tokens=300, rules=ANTHROPIC, model=None, topic=text, sources=[],
                                 cache_dir=settings.TIKTOKEN_CACHE_DIR)
    counted = reference_count("cl100k_base", text)
    assert result.content == math.ceil(Fraction(counted) * Fraction(11, 10))
    assert (result.tokens, result.base, result.method, result.encoding, result.calibration_samples) == (
        300 + result.content, 300, "calibrated", "cl100k_base", 0)
    if text is CJK:
        assert result.content > 1.5 * math.ceil(len(text) / 4)


@pytest.mark.parametrize("text", [CJK, CYRILLIC, ENGLISH * 3], ids=["cjk", "cyrillic", "english"])
def test_a_calibration_scales_the_encodings_count(text):
    used = estimation.CalibrationUsed(factor=Decimal("0.62"), samples=40, id=3, version=9)
    result = estimation.estimate(base_tokens=0, rules=ANTHROPIC, model=None, topic=text, sources=[],
                                 cache_dir=settings.TIKTOKEN_CACHE_DIR, calibration=used)
    assert result.content == math.ceil(Fraction(reference_count("cl100k_base", text)) * Fraction(62, 100))
    assert (result.method, result.calibration_samples) == ("calibrated", 40)


def test_topic_and_sources_are_counted_together():
    rules = estimation.ProviderRules(slug="openai", exact=True, default_encoding="o200k_base")
    result = estimation.estimate(base_tokens=0, rules=rules, model="gpt-4o", topic="Topic line",
                                 sources=["first source", "second source"], cache_dir=settings.TIKTOKEN_CACHE_DIR)
    assert result.content == reference_count("o200k_base", "Topic line\nfirst source\nsecond source")


@pytest.mark.django_db
def test_estimates_are_cached_in_redis_by_their_inputs(api, make_user):
    assert settings.CACHES["default"]["BACKEND"].endswith("RedisCache")
    user = make_user()
    body = estimate_body(user, model="gpt-4o")
    first = api.post("/api/tokens/estimate", body, format="json").json()
    second = api.post("/api/tokens/estimate", body, format="json").json()
    assert first["cached"] is False and second["cached"] is True
    assert {**first, "cached": True} == second
    keys = redis.Redis.from_url(settings.REDIS_URL).keys("*estimate:*")
    assert len(keys) == 1

    variants = [
        {"topic": ENGLISH + "!"},
        {"model": "gpt-4"},
        {"operationType": "analysis"},
        {"provider": "anthropic"},
        # the same text split differently between topic and sources
        {"topic": ENGLISH + "\n" + CYRILLIC, "sources": ["short source"]},
        {"topic": ENGLISH, "sources": [CYRILLIC + "\nshort source"]},
        {"topic": ENGLISH, "sources": [CYRILLIC, "short source", ""]},
    ]
    for change in variants:
        result = api.post("/api/tokens/estimate", {**body, **change}, format="json").json()
        assert result["cached"] is False, change
    assert len(redis.Redis.from_url(settings.REDIS_URL).keys("*estimate:*")) == 1 + len(variants)


def test_seed_cache_puts_the_packaged_encodings_where_tiktoken_looks(tmp_path):
    for name, url in TIKTOKEN_URLS.items():
        assert seed_cache(str(tmp_path), name) is True
        target = tmp_path / hashlib.sha1(url.encode()).hexdigest()
        assert hashlib.sha256(target.read_bytes()).hexdigest() == TIKTOKEN_HASHES[name]
        assert seed_cache(str(tmp_path), name) is True  # again: already there
    assert seed_cache(str(tmp_path), "r50k_base") is False  # not packaged: tiktoken downloads it as usual
    assert not list(tmp_path.glob("*.tmp"))


def test_encodings_load_offline_from_an_empty_cache(tmp_path):
    """In a fresh process with no network at all, estimation still counts exactly."""
    script = textwrap.dedent(f"""
        import socket

        def offline(*args, **kwargs):
            raise OSError("network disabled in this test")

        socket.socket.connect = offline
        socket.create_connection = offline
        socket.getaddrinfo = offline
        from metering.encodings import get_encoding
        for name in ("o200k_base", "cl100k_base", "tekken_240911"):
            print(name, len(get_encoding(name, {str(tmp_path)!r}).encode_ordinary({ENGLISH!r})))
    """)
    env = {k: v for k, v in os.environ.items() if k not in ("TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR")}
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    counts = dict(line.split() for line in done.stdout.splitlines())
    assert counts == {**{name: str(reference_count(name, ENGLISH)) for name in ("o200k_base", "cl100k_base")},
                      "tekken_240911": str(mistral_count(ENGLISH))}
    assert len(list(tmp_path.iterdir())) == 2


@pytest.mark.django_db
def test_estimates_still_work_when_the_cache_is_down(api, make_user, settings):
    user = make_user()
    expected = api.post("/api/tokens/estimate", estimate_body(user), format="json").json()["tokens"]
    settings.CACHES = {**settings.CACHES, "default": {"BACKEND": "django.core.cache.backends.redis.RedisCache",
                                                      "LOCATION": "redis://127.0.0.1:1/0"}}  # nothing listens there
    for _ in range(2):
        response = api.post("/api/tokens/estimate", estimate_body(user), format="json")
        assert response.status_code == 200, response.content
        assert response.json()["tokens"] == expected and response.json()["cached"] is False
