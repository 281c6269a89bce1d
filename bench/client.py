"""Consumes per second through the Python client (clients/python) against raw HTTP, same run.

    python bench/client.py                     # 3 rounds of 8 s per step, 16 threads
    python bench/client.py --rounds 1 --duration 5 --threads 8

Four steps, on the server bench/run.py starts (gunicorn with the project's config on the bench
database, bench/seed.py's users and key), each driven by threads of this process:
- raw single: httpx.Client per thread, POST /api/tokens/consume with a body built by hand;
- client single: one shared consensus_tokens_client.Client, client.consume(...) (operation id,
  typed answer, retry loop);
- raw batch: httpx.Client per thread, POST /api/tokens/consume/batch of 1,000 hand-built items;
- recorder: one shared BatchRecorder, recorder.add(...) from every thread; counted once every
  queued item is answered (the final flush included).
The client's cost is the ratio to its raw reference measured in the same round; the best round
of each step is reported, with the spread.
"""
from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import threading
import time
import uuid
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.run import Server, log, prepare, vacuum  # noqa: E402
from consensus_tokens_client import Client  # noqa: E402

OPS = ("consensus", "analysis", "summary", "comparison")


class Users:
    def __init__(self, first: int, last: int) -> None:
        self._next = itertools.count()
        self.first, self.span = first, last - first + 1

    def pick(self) -> int:
        return self.first + (next(self._next) * 7) % self.span


def for_seconds(threads: int, seconds: float, work) -> int:
    """Run work(stop_at) in `threads` threads; the sum of what they return."""
    stop_at = time.monotonic() + seconds
    done: list[int] = []
    pool = [threading.Thread(target=lambda: done.append(work(stop_at))) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return sum(done)


def item(users: Users, n: int) -> dict:
    return {"userId": users.pick(), "operationId": f"cb-{uuid.uuid4().hex}", "tokens": 100 + n % 900,
            "operationType": OPS[n % 4], "provider": "openai", "model": "gpt-4o", "estimatedTokens": 120 + n % 800}


def consume_args(users: Users, n: int) -> dict:
    """The same consume as item(), as the client's keyword arguments (it makes the operation id)."""
    return {"user_id": users.pick(), "tokens": 100 + n % 900, "operation_type": OPS[n % 4], "provider": "openai",
            "model": "gpt-4o", "estimated_tokens": 120 + n % 800}


def raw_single(url: str, key: str, users: Users, threads: int, seconds: float) -> float:
    def work(stop_at: float) -> int:
        count = 0
        with httpx.Client(base_url=url, headers={"Authorization": f"Api-Key {key}"}) as http:
            while time.monotonic() < stop_at:
                response = http.post("/api/tokens/consume", json=item(users, count))
                count += response.status_code == 201
        return count

    started = time.monotonic()
    return for_seconds(threads, seconds, work) / (time.monotonic() - started)


def client_single(client: Client, users: Users, threads: int, seconds: float) -> float:
    def work(stop_at: float) -> int:
        count = 0
        while time.monotonic() < stop_at:
            client.consume(**consume_args(users, count))
            count += 1
        return count

    started = time.monotonic()
    return for_seconds(threads, seconds, work) / (time.monotonic() - started)


def raw_batch(url: str, key: str, users: Users, threads: int, seconds: float, size: int) -> float:
    def work(stop_at: float) -> int:
        count = 0
        with httpx.Client(base_url=url, headers={"Authorization": f"Api-Key {key}"}, timeout=60) as http:
            while time.monotonic() < stop_at:
                body = {"operations": [item(users, count + i) for i in range(size)]}
                response = http.post("/api/tokens/consume/batch", json=body)
                count += size if response.status_code == 201 else 0
        return count

    started = time.monotonic()
    return for_seconds(threads, seconds, work) / (time.monotonic() - started)


def recorder(client: Client, users: Users, threads: int, seconds: float, senders: int) -> float:
    started = time.monotonic()
    with client.recorder(flush_interval=0.05, max_queue=20_000, senders=senders) as rec:
        def work(stop_at: float) -> int:
            count = 0
            while time.monotonic() < stop_at:
                rec.add(**consume_args(users, count))
                count += 1
            return count

        for_seconds(threads, seconds, work)
    elapsed = time.monotonic() - started  # the flush of what was still queued included
    if rec.failures:
        raise SystemExit(f"the recorder reported {len(rec.failures)} failures: {rec.failures[0].error}")
    return (rec.recorded + rec.replayed) / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=8)
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--batch-threads", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument("--senders", type=int, default=2, help="the recorder's batches in flight at once")
    parser.add_argument("--workers", type=int, default=5)
    args = parser.parse_args()
    seed = prepare(1000)
    first, last = (int(x) for x in seed["USERS"].split("-"))
    users, key = Users(first, last), seed["BENCH_KEY"]
    server = Server(workers=args.workers, worker_class="sync", threads=1)
    figures: dict[str, list[float]] = {"raw single": [], "client single": [], "raw batch": [], "recorder": []}
    try:
        server.wait_ready()
        with Client(server.url, key, max_connections=args.threads) as client:
            for round_ in range(1, args.rounds + 1):
                vacuum()
                log(f"round {round_}/{args.rounds}")
                figures["raw single"].append(raw_single(server.url, key, users, args.threads, args.duration))
                figures["client single"].append(client_single(client, users, args.threads, args.duration))
                vacuum()
                figures["raw batch"].append(raw_batch(server.url, key, users, args.batch_threads, args.duration,
                                                      args.batch_size))
                figures["recorder"].append(recorder(client, users, args.threads, args.duration, args.senders))
    finally:
        server.stop()

    def best(name: str) -> float:
        return max(figures[name])

    def spread(name: str) -> str:
        values = figures[name]
        return f"{min(values):,.0f}-{max(values):,.0f}" if len(values) > 1 else "-"

    print(f"\nPython client vs raw HTTP ({args.rounds} rounds of {args.duration:g} s, {args.threads} threads, "
          f"{args.workers} sync workers)\n")
    print("| step | consumes/s (best) | spread | ratio to its raw reference |")
    print("|---|---:|---:|---:|")
    print(f"| raw single (httpx) | {best('raw single'):,.0f} | {spread('raw single')} | 1.00 |")
    print(f"| client.consume | {best('client single'):,.0f} | {spread('client single')} | "
          f"{best('client single') / best('raw single'):.2f} |")
    print(f"| raw batch of {args.batch_size} (httpx, {args.batch_threads} threads) | {best('raw batch'):,.0f} | "
          f"{spread('raw batch')} | 1.00 |")
    print(f"| BatchRecorder.add ({args.senders} senders) | {best('recorder'):,.0f} | {spread('recorder')} | "
          f"{best('recorder') / best('raw batch'):.2f} |")
    per_round = [c / r for c, r in zip(figures["client single"], figures["raw single"])]
    print(f"\nclient/raw single per round: {', '.join(f'{x:.2f}' for x in per_round)} "
          f"(median {statistics.median(per_round):.2f})")


if __name__ == "__main__":
    main()
