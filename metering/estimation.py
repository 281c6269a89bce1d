"""Estimating the tokens an operation will need. Pure: no database.

tokens = the operation type's base cost + the tokens of its content (topic and
sources). OpenAI models are counted exactly with the model's tiktoken encoding.
Other providers are counted with a tiktoken encoding scaled by a learned
calibration factor; until the factor has learned from enough settled
operations, the provider's chars- and words-per-token ratios act as a floor,
because a characters ratio alone is far off on non-Latin text.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from decimal import Decimal

from .encodings import encoding_for_model, get_encoding

# Settled operations a calibrated provider needs before its ratios stop acting as a floor.
CALIBRATION_MIN_SAMPLES = 20


@dataclass(frozen=True)
class ProviderRules:
    slug: str
    exact: bool
    default_encoding: str
    chars_per_token: Decimal
    words_per_token: Decimal
    calibration_factor: Decimal = Decimal("1")
    calibration_samples: int = 0


@dataclass(frozen=True)
class Estimate:
    tokens: int
    base: int
    content: int
    provider: str
    encoding: str
    method: str

    def as_dict(self) -> dict:
        return {
            "tokens": self.tokens,
            "breakdown": {"base": self.base, "content": self.content},
            "provider": self.provider,
            "encoding": self.encoding,
            "method": self.method,
        }


def content_text(topic: str, sources: list[str]) -> str:
    return "\n".join([topic, *sources]) if sources else topic


def ratio_tokens(text: str, rules: ProviderRules) -> int:
    """The larger of the chars- and words-based counts."""
    by_chars = math.ceil(Decimal(len(text)) / rules.chars_per_token) if text else 0
    words = len(text.split())
    by_words = math.ceil(Decimal(words) / rules.words_per_token) if words else 0
    return max(by_chars, by_words)


def estimate(*, base_tokens: int, rules: ProviderRules, model: str | None, topic: str, sources: list[str],
             cache_dir: str) -> Estimate:
    text = content_text(topic, sources)
    encoding_name = encoding_for_model(model, rules.default_encoding) if rules.exact else rules.default_encoding
    counted = len(get_encoding(encoding_name, cache_dir).encode_ordinary(text)) if text else 0
    if rules.exact:
        content, method = counted, "exact"
    else:
        content = math.ceil(Decimal(counted) * rules.calibration_factor)
        method = "calibrated"
        if rules.calibration_samples < CALIBRATION_MIN_SAMPLES:
            content = max(content, ratio_tokens(text, rules))
            method = "calibrated+ratio-floor"
    return Estimate(tokens=base_tokens + content, base=base_tokens, content=content, provider=rules.slug,
                    encoding=encoding_name, method=method)
