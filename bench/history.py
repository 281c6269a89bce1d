"""Does a user's history size change the time of GET usage and consume?

Calls the full Django stack in this process (WSGI, middleware, auth, rate
limits, the views, PostgreSQL, Redis), alternating request by request between
the user with 1,000 ledger rows and the one with 1,000,000, so both see exactly
the same background load; prints the median time of each. The wrk runs in
run.py measure the same over HTTP, but on a shared machine their slices can
catch different load.

    DJANGO_SETTINGS_MODULE=bench.settings python -m bench.history --json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import django

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "bench.settings")
django.setup()

from django.contrib.auth import get_user_model  # noqa: E402
from django.core.handlers.wsgi import WSGIHandler  # noqa: E402

from bench.inprocess import environ  # noqa: E402
from bench.seed import HISTORY_USERS  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("-n", type=int, default=1000, help="requests per user and kind")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    users = dict(get_user_model().objects.filter(username__in=HISTORY_USERS).values_list("username", "pk"))
    by_size = {"1k": users["bench-hist-1k"], "1m": users["bench-hist-1m"]}
    app = WSGIHandler()
    run = time.time_ns()

    def request(kind: str, user_id: int, i: int) -> float:
        if kind == "usage":
            env = environ("GET", "/api/tokens/usage", query=f"userId={user_id}")
        else:
            body = {"userId": user_id, "operationId": f"h-{run}-{i}", "tokens": 1, "operationType": "summary"}
            env = environ("POST", "/api/tokens/consume", json.dumps(body).encode())
        statuses = []
        started = time.perf_counter()
        b"".join(app(env, lambda status, headers: statuses.append(status)))
        elapsed = time.perf_counter() - started
        if not statuses[0].startswith("20"):
            raise SystemExit(f"{kind} for user {user_id}: {statuses[0]}")
        return elapsed * 1000

    results = {}
    for kind in ("usage", "consume"):
        times: dict[str, list[float]] = {"1k": [], "1m": []}
        for i in range(-20, args.n):  # the first 20 of each warm up
            for size in (("1k", "1m") if i % 2 else ("1m", "1k")):
                t = request(kind, by_size[size], i)
                if i >= 0:
                    times[size].append(t)
        a, b = statistics.median(times["1k"]), statistics.median(times["1m"])
        results[kind] = {"1k_ms": a, "1m_ms": b, "apart": abs(b - a) / a}
        if not args.json:
            print(f"{kind}: median {a:.3f} ms with 1K rows, {b:.3f} ms with 1M rows ({abs(b - a) / a:.0%} apart)")
    print(json.dumps({"requests": args.n, **results}))


if __name__ == "__main__":
    main()
