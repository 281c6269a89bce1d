"""CPU cost per request of the WSGI app itself, without HTTP or a load generator:
builds WSGI environs and calls the Django application in this process. Useful to
see where the time goes (--profile prints cProfile's top functions), and steadier
than wall-clock figures on a busy machine because it reports CPU time.

    DJANGO_SETTINGS_MODULE=bench.settings python -m bench.inprocess consume --profile
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import sys
import time

import django

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "bench.settings")
django.setup()

from django.core.handlers.wsgi import WSGIHandler  # noqa: E402

from bench.seed import BENCH_KEY  # noqa: E402


def environ(method: str, path: str, body: bytes = b"", query: str = "") -> dict:
    return {
        "REQUEST_METHOD": method, "PATH_INFO": path, "QUERY_STRING": query, "SERVER_NAME": "127.0.0.1",
        "SERVER_PORT": "8000", "HTTP_HOST": "127.0.0.1", "REMOTE_ADDR": "127.0.0.1", "wsgi.url_scheme": "http",
        "wsgi.input": io.BytesIO(body), "CONTENT_LENGTH": str(len(body)), "CONTENT_TYPE": "application/json",
        "HTTP_AUTHORIZATION": f"Api-Key {BENCH_KEY}", "HTTP_USER_AGENT": "bench", "wsgi.errors": sys.stderr,
    }


def make(kind: str, i: int, run: str, batch: int) -> dict:
    if kind == "bare":
        return environ("GET", "/bench/bare")
    if kind == "usage":
        return environ("GET", "/api/tokens/usage", query="userId=1")
    if kind == "consume":
        body = {"userId": 1 + i % 1000, "operationId": f"ip-{run}-{i}", "tokens": 100 + i % 900,
                "operationType": "analysis", "provider": "openai", "model": "gpt-4o", "estimatedTokens": 150}
        return environ("POST", "/api/tokens/consume", json.dumps(body).encode())
    if kind == "batch":
        ops = [{"userId": 1 + (i * batch + j) % 1000, "operationId": f"ipb-{run}-{i}-{j}", "tokens": 1 + j % 500,
                "operationType": "summary", "provider": "openai"} for j in range(batch)]
        return environ("POST", "/api/tokens/consume/batch", json.dumps({"operations": ops}).encode())
    raise SystemExit(f"unknown kind {kind}")


def _postgres_cpu_reader():
    """CPU seconds used so far by this process's PostgreSQL backend (Linux, local server
    readable by this user), or a function returning 0.0 where that cannot be read."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        pid = cursor.fetchone()[0]
    stat = f"/proc/{pid}/stat"

    def read() -> float:
        try:
            with open(stat) as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            return 0.0
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return read


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("kind", choices=["bare", "usage", "consume", "batch"])
    parser.add_argument("-n", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--gc-freeze", action="store_true", help="gc.freeze() after warming up, as gunicorn.conf.py does")
    args = parser.parse_args()
    app = WSGIHandler()
    run = str(time.time_ns())
    statuses: dict[str, int] = {}

    def call(i: int) -> None:
        def start_response(status, headers):
            statuses[status] = statuses.get(status, 0) + 1
        b"".join(app(make(args.kind, i, run, args.batch), start_response))

    for i in range(min(50, args.n)):  # warm up
        call(-i - 1)
    statuses.clear()
    if args.gc_freeze:
        import gc

        gc.freeze()
    pg_cpu = _postgres_cpu_reader()
    prof = (cProfile.Profile(time.process_time) if os.environ.get("BENCH_CPU_PROFILE") else cProfile.Profile()) if args.profile else None
    pg_before = pg_cpu()
    wall, cpu = time.perf_counter(), time.process_time()
    if prof:
        prof.enable()
    for i in range(args.n):
        call(i)
    if prof:
        prof.disable()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    pg = pg_cpu() - pg_before
    print(f"{args.kind}: {args.n} requests, {wall / args.n * 1e3:.3f} ms wall, {cpu / args.n * 1e3:.3f} ms CPU here "
          f"+ {pg / args.n * 1e3:.3f} ms in the PostgreSQL backend, per request; statuses {statuses}")
    if prof:
        pstats.Stats(prof).sort_stats(os.environ.get("BENCH_SORT", "cumulative")).print_stats(int(os.environ.get("BENCH_TOP", "45")))


if __name__ == "__main__":
    main()
