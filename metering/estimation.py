"""Estimating the tokens an operation will need, and learning how far off the
estimates are. Pure: no database.

tokens = the operation type's base cost + the tokens of its content (topic and
sources). OpenAI models are counted exactly with the model's tiktoken encoding.
Other providers are counted with a tiktoken encoding (a fast, stable base that
sees the script) times a calibration learned from settled operations, per
provider, model and script class (`script_class`), since one ratio cannot hold
across scripts; until one is learnt, the provider's staff-set starting factor.
There is no chars- or words-per-token floor: tiktoken already sees the script,
and a floor would make the first settlements teach a factor that is too low
(the estimate they settle against was not tiktoken x factor).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from decimal import Decimal

from .encodings import encoding_for_model, get_encoding

# The script classes a content is put in (`script_class`), and "" for unknown (a
# consume that did not say).
LATIN, CODE, CYRILLIC, CJK, OTHER = "latin", "code", "cyrillic", "cjk", "other"
SCRIPT_CLASSES = (LATIN, CODE, CYRILLIC, CJK, OTHER)

# A calibration is used for estimates once it has this many samples; below it a
# broader one (any model, then any script) that has is used instead.
CALIBRATION_MIN_SAMPLES = 10

# The learning (calibration_learn). In log space, so too high and too low weigh alike:
# each sample moves the figure by a weight that starts at 1/n (a plain running mean,
# which converges fast) and never drops below LEARN_RATE_FLOOR (older samples fade with
# a half-life of about 25 samples, so a tokenizer change is followed); a sample's pull is
# clamped to a few times the typical deviation seen so far, so one outlier moves the
# figure by at most ~LEARN_RATE_FLOOR x that clamp.
LEARN_RATE_FLOOR = 0.03
DEVIATION_START = 0.2  # log units: the typical deviation assumed before samples say
DEVIATION_CLAMP = 3.0  # a sample pulls at most this many typical deviations...
CLAMP_MIN, CLAMP_MAX = 0.05, 0.7  # ...and between these (log units; 0.7 is about x2)
FACTOR_BOUNDS = (0.05, 20.0)
ERROR_RATE_FLOOR = 0.05  # the recent error: a running mean of the last ~20 samples


@dataclass(frozen=True)
class ProviderRules:
    slug: str
    exact: bool
    default_encoding: str
    # The staff-set starting factor, used until a calibration has learnt one.
    calibration_factor: Decimal = Decimal("1")


@dataclass(frozen=True)
class CalibrationUsed:
    """The calibration an estimate applies: its factor, how many samples taught it,
    and its id and version (part of the estimate cache's key)."""
    factor: Decimal
    samples: int
    id: int = 0
    version: int = 0


@dataclass(frozen=True)
class Estimate:
    tokens: int
    base: int
    content: int
    provider: str
    encoding: str
    method: str
    script_class: str
    calibration_samples: int

    def as_dict(self) -> dict:
        return {
            "tokens": self.tokens,
            "breakdown": {"base": self.base, "content": self.content},
            "provider": self.provider,
            "encoding": self.encoding,
            "method": self.method,
            "scriptClass": self.script_class,
            "calibrationSamples": self.calibration_samples,
        }


def content_text(topic: str, sources: list[str]) -> str:
    return "\n".join([topic, *sources]) if sources else topic


SCRIPT_SAMPLE_CHARS = 4096


def _leads(*ranges: tuple[int, int]) -> bytes:
    return bytes(b for low, high in ranges for b in range(low, high + 1))


# Told from the text's UTF-8 bytes, each class by the lead bytes of its code points, counted
# with bytes.translate (C): a cached estimate's whole budget is a millisecond, and a loop in
# Python over the sample, or regular expressions that match most of it, take about that.
_ASCII_LETTERS = bytes(range(ord("A"), ord("Z") + 1)) + bytes(range(ord("a"), ord("z") + 1))
_CODE_MARKS = b"{}[]();=<>_\\|&*#$/:"
_LATIN_EXT = _leads((0xC3, 0xC9))  # U+00C0-U+027F: accented Latin
_CYRILLIC = _leads((0xD0, 0xD4))  # U+0400-U+053F
_CJK = _leads((0xE3, 0xED), (0xEF, 0xEF))  # U+3000-U+DFFF (kana, Han, Hangul) and full-width forms
_OTHER = _leads((0xCA, 0xCF), (0xD5, 0xDF), (0xE0, 0xE1))  # Greek, Hebrew, Arabic, Indic, Thai...


def _count(data: bytes, which: bytes) -> int:
    return len(data) - len(data.translate(None, which))


def script_class(text: str) -> str:
    """The content's script class, from at most SCRIPT_SAMPLE_CHARS characters taken
    evenly across it (cheap on a long text): CJK, Cyrillic, code, Latin prose or other.
    CJK wins at a lower share because one CJK character is a word's worth of text."""
    if len(text) > SCRIPT_SAMPLE_CHARS:
        text = text[::len(text) // SCRIPT_SAMPLE_CHARS]
    data = text.encode("utf-8", "surrogatepass")
    latin = _count(data, _ASCII_LETTERS) + _count(data, _LATIN_EXT)
    cyrillic, cjk, marks = _count(data, _CYRILLIC), _count(data, _CJK), _count(data, _CODE_MARKS)
    letters = latin + cyrillic + cjk + _count(data, _OTHER)
    if not letters:
        return CODE if marks else OTHER
    if cjk * 4 >= letters:
        return CJK
    if cyrillic * 2 > letters:
        return CYRILLIC
    if latin * 2 > letters:
        # code has a mark ({, =, _ ...) every ten letters or so (bench/corpus: 1 in 10 at
        # least); prose one in a hundred at most (0 to 1 in 100 there)
        return CODE if marks * 25 > latin else LATIN
    return OTHER


def estimate(*, base_tokens: int, rules: ProviderRules, model: str | None, topic: str, sources: list[str],
             cache_dir: str, calibration: CalibrationUsed | None = None, script: str | None = None) -> Estimate:
    """`calibration`: the one learnt for this provider, model and script, if any (the
    service picks it); without one a calibrated provider's starting factor applies.
    `script`: the text's script class if the caller has it."""
    text = content_text(topic, sources)
    script = script if script is not None else script_class(text)
    encoding_name = encoding_for_model(model, rules.default_encoding) if rules.exact else rules.default_encoding
    counted = len(get_encoding(encoding_name, cache_dir).encode_ordinary(text)) if text else 0
    samples = 0
    if rules.exact:
        content, method = counted, "exact"
    else:
        factor = calibration.factor if calibration is not None else rules.calibration_factor
        samples = calibration.samples if calibration is not None else 0
        content, method = math.ceil(Decimal(counted) * factor), "calibrated"
    return Estimate(tokens=base_tokens + content, base=base_tokens, content=content, provider=rules.slug,
                    encoding=encoding_name, method=method, script_class=script, calibration_samples=samples)


# --- learning ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LearnState:
    """A calibration's figures: the factor, in log space; the typical deviation of a
    sample from it (log units); the samples seen; the recent mean absolute error of
    the estimates themselves (0.1 = 10%)."""
    log_factor: float = 0.0
    deviation: float = DEVIATION_START
    samples: int = 0
    error: float | None = None

    @property
    def factor(self) -> float:
        return math.exp(self.log_factor)


def calibration_learn(state: LearnState, *, estimated: int, actual: int, factor_used: float) -> LearnState:
    """One settled operation: it was estimated at `estimated` tokens with `factor_used`
    and took `actual`, so the factor that would have been right is factor_used x
    actual / estimated. Move towards it robustly (see the constants above)."""
    target = math.log(factor_used) + math.log(actual / estimated)
    n = state.samples + 1
    rate = max(1.0 / n, LEARN_RATE_FLOOR)
    residual = target - state.log_factor
    if state.samples == 0:
        # The first sample replaces the prior, within a factor of two of it.
        pulled = max(-CLAMP_MAX, min(CLAMP_MAX, residual))
    else:
        limit = max(CLAMP_MIN, min(CLAMP_MAX, DEVIATION_CLAMP * state.deviation))
        pulled = max(-limit, min(limit, residual))
    low, high = (math.log(b) for b in FACTOR_BOUNDS)
    log_factor = max(low, min(high, state.log_factor + rate * pulled))
    deviation = state.deviation if state.samples == 0 else (
        state.deviation + max(1.0 / state.samples, LEARN_RATE_FLOOR) * (abs(pulled) - state.deviation))
    miss = abs(actual - estimated) / actual
    error = miss if state.error is None else state.error + max(1.0 / n, ERROR_RATE_FLOOR) * (miss - state.error)
    return LearnState(log_factor=log_factor, deviation=deviation, samples=n, error=error)
