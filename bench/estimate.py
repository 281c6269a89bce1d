"""Time estimating 100 kB of text: the service function the API calls
(`tokens_estimate`: operation type and provider rows from PostgreSQL, hashing,
the Redis cache, tiktoken), uncached and cached, with many repeats.

Encodings are loaded before timing starts. Uncached runs change the text's first
characters each time, so every one misses the cache and also pays for storing
its result. Run with the bench settings (Redis db 9):

    DJANGO_SETTINGS_MODULE=bench.settings python -m bench.estimate
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time

import django

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "bench.settings")
django.setup()

from django.conf import settings  # noqa: E402

from metering.encodings import get_encoding  # noqa: E402
from metering.services import tokens_estimate  # noqa: E402

WORDS = ("the model compares sources and weighs each claim against evidence before it reaches a consensus "
         "analysis summary report shows where experts agree disagree and why numbers like 42 or 3.14 matter "
         "because context changes meaning tokens cost money so we measure them carefully every single time").split()


def prose(size: int, seed: int = 7) -> str:
    rng = random.Random(seed)
    parts, n = [], 0
    while n < size:
        sentence = " ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 18))).capitalize() + ". "
        parts.append(sentence)
        n += len(sentence)
    return "".join(parts)[:size]


def timed(fn, repeats: int) -> list[float]:
    out = []
    for i in range(repeats):
        started = time.perf_counter()
        fn(i)
        out.append((time.perf_counter() - started) * 1000)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    text = prose(args.size)
    for name in ("o200k_base", "cl100k_base"):  # loading is not what we time
        get_encoding(name, settings.TIKTOKEN_CACHE_DIR).encode_ordinary("warm up")
    run = f"{time.time_ns()}"
    cases = [("openai", "gpt-4o"), ("anthropic", "claude-sonnet-4")]
    results = {}
    for provider, model in cases:
        def uncached(i: int, provider=provider, model=model) -> None:
            r = tokens_estimate(operation_type="analysis", provider=provider, model=model,
                                topic=f"{run}-{i} " + text[len(run) + 8:], sources=[])
            assert not r["cached"]

        def cached(i: int, provider=provider, model=model) -> None:
            r = tokens_estimate(operation_type="analysis", provider=provider, model=model, topic=text, sources=[])
            assert r["cached"] or i == 0

        cached(0)  # store it once
        uncached_ms = timed(uncached, args.repeats)
        cached_ms = timed(cached, args.repeats * 5)
        results[provider] = {
            "uncached_ms": statistics.median(uncached_ms), "uncached_p90_ms": sorted(uncached_ms)[int(len(uncached_ms) * .9)],
            "cached_ms": statistics.median(cached_ms), "cached_p90_ms": sorted(cached_ms)[int(len(cached_ms) * .9)],
        }
    worst = {
        "uncached_ms": max(r["uncached_ms"] for r in results.values()),
        "cached_ms": max(r["cached_ms"] for r in results.values()),
        "repeats": args.repeats,
        "size": len(text),
        "by_provider": results,
    }
    if not args.json:
        for provider, r in results.items():
            print(f"{provider:10s} uncached median {r['uncached_ms']:.2f} ms (p90 {r['uncached_p90_ms']:.2f}), "
                  f"cached median {r['cached_ms']:.3f} ms (p90 {r['cached_p90_ms']:.3f})")
    print(json.dumps(worst))


if __name__ == "__main__":
    main()
