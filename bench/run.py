"""Run the issue-2 benchmarks end to end and print a results table.

    python bench/run.py                 # everything, about 4 minutes
    python bench/run.py --rounds 3      # the HTTP runs three times, best and spread reported
    python bench/run.py --only consume,bare --duration 5
    python bench/run.py --only bare,consume,batch,floor   # with the floor views (bench/floor.py)

Steps: create the bench_consensus database if missing, migrate it, seed it
(bench/seed.py, idempotent), start gunicorn with consensus_tokens/gunicorn.conf.py
and bench.settings on a free loopback port, drive it with wrk from a second
process (Lua scripts in bench/), compare history sizes request by request in
process (bench/history.py), time estimation in-process (bench/estimate.py),
stop gunicorn, print the table. Nothing outside the bench database and Redis db 9
is touched.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PG = os.environ.get("BENCH_PG", "postgres://postgres@127.0.0.1:5432")
DB_NAME = os.environ.get("BENCH_DB", "bench_consensus")
REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/9")
# bench/floor.py's views, cheapest first (not imported: it needs Django set up)
FLOOR_VARIANTS = ("post", "redis", "select1", "consume-sql", "redis+consume-sql")
METRICS_TOKEN = "bench-scrape"
STEPS = ("bare", "consume", "c64", "c1", "usage", "batch", "floor", "history", "estimate")


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def bench_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "DJANGO_SETTINGS_MODULE": "bench.settings",
        "DATABASE_URL": f"{PG}/{DB_NAME}",
        "REDIS_URL": REDIS_URL,
        "PYTHONPATH": str(ROOT),
    })
    env.update(extra or {})
    return env


def prepare(users: int) -> dict[str, str]:
    """Database, migrations and seed data; returns the seed's KEY=VALUE lines."""
    exists = subprocess.run(["psql", f"{PG}/postgres", "-tAc", f"SELECT 1 FROM pg_database WHERE datname='{DB_NAME}'"],
                            capture_output=True, text=True, check=True).stdout.strip()
    if not exists:
        log(f"creating database {DB_NAME}")
        subprocess.run(["psql", f"{PG}/postgres", "-qc", f'CREATE DATABASE "{DB_NAME}"'], check=True)
    log("migrating")
    subprocess.run([sys.executable, "manage.py", "migrate", "-v0"], cwd=ROOT, env=bench_env(), check=True, timeout=300)
    log("seeding")
    out = subprocess.run([sys.executable, "-m", "bench.seed", "--users", str(users)], cwd=ROOT, env=bench_env(),
                         capture_output=True, text=True, check=True, timeout=300).stdout
    seed = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
    for line in out.splitlines():
        if "=" not in line:
            log(line)
    return seed


def vacuum() -> None:
    """This server runs with autovacuum off, so the counters' hot rows would bloat
    from run to run; production vacuums them continuously. Cheap: a few MB."""
    subprocess.run(["psql", f"{PG}/{DB_NAME}", "-qc",
                    "VACUUM ANALYZE metering_usageperiod, metering_account, metering_servicekey, metering_tier"],
                   check=True, capture_output=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """gunicorn with the project's config file, on a free loopback port."""

    def __init__(self, *, workers: int, worker_class: str, threads: int, name: str = "bench-gunicorn") -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.label = f"{workers}x{worker_class}" + (f"/{threads} threads" if worker_class == "gthread" else "")
        self.log_path = ROOT / "artifacts" / f"{name}.log"
        self.log_path.parent.mkdir(exist_ok=True)
        env = bench_env({"GUNICORN_BIND": f"127.0.0.1:{self.port}", "GUNICORN_WORKERS": str(workers),
                         "GUNICORN_WORKER_CLASS": worker_class, "GUNICORN_THREADS": str(threads),
                         "GUNICORN_LOG_LEVEL": "warning", "METRICS_TOKEN": METRICS_TOKEN})
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-c", "consensus_tokens/gunicorn.conf.py", "consensus_tokens.wsgi"],
            cwd=ROOT, env=env, stdout=self.log_path.open("w"), stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"gunicorn exited; see {self.log_path}")
            try:
                with urllib.request.urlopen(f"{self.url}/bench/bare", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.3)
        raise SystemExit("gunicorn did not answer in time")

    def combining(self) -> tuple[float, float]:
        """(groups written, consumes written in them) since the start: group commit's counters."""
        request = urllib.request.Request(f"{self.url}/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"})
        with urllib.request.urlopen(request, timeout=10) as r:
            text = r.read().decode()
        found = dict.fromkeys(("ct_consume_groups_total", "ct_consume_grouped_total"), 0.0)
        for line in text.splitlines():
            name, _, value = line.partition(" ")
            if name in found:
                found[name] = float(value)
        return found["ct_consume_groups_total"], found["ct_consume_grouped_total"]

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


@dataclass
class Run:
    name: str
    rps: list[float] = field(default_factory=list)
    p50: list[float] = field(default_factory=list)
    p99: list[float] = field(default_factory=list)
    max_ms: list[float] = field(default_factory=list)
    errors: int = 0
    ops_per_request: int = 1

    def add(self, r: dict) -> None:
        self.rps.append(r["rps"])
        self.p50.append(r["p50_ms"])
        self.p99.append(r["p99_ms"])
        self.max_ms.append(r["max_ms"])
        self.errors += r["errors"]

    @property
    def best(self) -> int:  # index of the best round (highest throughput)
        return max(range(len(self.rps)), key=lambda i: self.rps[i])

    def spread(self) -> str:
        if len(self.rps) < 2:
            return ""
        return f"{min(self.rps):.0f}–{max(self.rps):.0f}"


def wrk(url: str, script: str, *, connections: int, duration: float, threads: int = 2,
        env: dict[str, str] | None = None) -> dict:
    cmd = ["wrk", f"-t{min(threads, connections)}", f"-c{connections}", f"-d{int(round(duration))}s", "--timeout", "5s",
           "-s", f"bench/{script}", url]
    out = subprocess.run(cmd, cwd=ROOT, env={**os.environ, **(env or {})}, capture_output=True, text=True,
                         timeout=duration + 60)
    match = re.search(r"^WRK_JSON (.*)$", out.stdout, re.M)
    if out.returncode != 0 or match is None:
        raise SystemExit(f"wrk failed: {out.stdout}\n{out.stderr}")
    return json.loads(match.group(1))


def http_rounds(server: Server, seed: dict[str, str], args: argparse.Namespace,
                reference: Server | None = None) -> dict[str, Run]:
    first, last = seed["USERS"].split("-")
    base = {"BENCH_KEY": seed["BENCH_KEY"], "BENCH_USER_FIRST": first, "BENCH_USER_LAST": last}
    runs: dict[str, Run] = {}
    d = args.duration
    c = args.connections

    def measure(name: str, script: str, *, path: str = "/", conns: int = c, duration: float = d,
                ops: int = 1, on: Server = server, **extra: str) -> None:
        env = {**base, "BENCH_RUN": f"{int(time.time() * 1000)}{name}", **extra}
        vacuum()
        result = wrk(on.url + path, script, connections=conns, duration=duration, env=env)
        run = runs.setdefault(name, Run(name, ops_per_request=ops))
        run.add(result)
        log(f"{name}: {result['rps'] * ops:,.0f} {'ops' if ops > 1 else 'req'}/s p50 {result['p50_ms']:.2f} ms "
            f"p99 {result['p99_ms']:.2f} ms errors {result['errors']}")

    # Warm every worker: imports, connections, tiktoken-free paths, plan caches, and each
    # worker's cached rate limits of the load users (metering/throttling.py's _TierLimits), as a worker
    # that has been up a while has them. A request reaches a random worker, so a user
    # needs ~13 requests before all 5 workers have seen it with 95% odds: 20 s of consumes
    # (~13,000 at this machine's rate) for the 1,000 load users; 2 s left most workers cold.
    warm_consume = 20.0 if args.only & {"consume", "c64", "c1", "batch", "floor"} else 2.0
    servers = [(server, "")] + ([(reference, "ref ")] if reference else [])
    for on, _ in servers:
        for script, path, seconds in (("bare.lua", "/bench/bare", 2), ("consume.lua", "/", warm_consume),
                                      ("usage.lua", "/", 2)):
            wrk(on.url + path, script, connections=c, duration=seconds,
                env={**base, "BENCH_RUN": f"warm{time.time()}"})
    for round_ in range(args.rounds):
        log(f"round {round_ + 1}/{args.rounds}")
        # The reference server (today's serving model, --reference) right after the one
        # measured, step by step: both see the same background load.
        for on, ref in servers:
            if "bare" in args.only:
                measure(f"{ref}bare", "bare.lua", path="/bench/bare", on=on)
            if "consume" in args.only:
                measure(f"{ref}consume", "consume.lua", on=on)
        for conns, step in ((64, "c64"), (1, "c1")):
            if step in args.only:
                for on, ref in servers:
                    measure(f"{ref}bare@{conns}", "bare.lua", path="/bench/bare", conns=conns, on=on)
                    measure(f"{ref}consume@{conns}", "consume.lua", conns=conns, on=on)
        for on, ref in servers:
            if "usage" in args.only:
                measure(f"{ref}usage", "usage.lua", on=on)
            if "batch" in args.only:
                measure(f"{ref}batch", "batch.lua", conns=args.batch_connections, ops=args.batch_size,
                        BENCH_BATCH=str(args.batch_size), on=on)
        if "floor" in args.only:
            # What the stack allows at best (bench/floor.py), each against this round's bare run.
            for variant in FLOOR_VARIANTS:
                measure(f"floor {variant}", "consume.lua", BENCH_PATH=f"/bench/floor/{variant}")
            measure("floor batch-ledger", "batch.lua", conns=args.batch_connections, ops=args.batch_size,
                    BENCH_BATCH=str(args.batch_size), BENCH_PATH="/bench/floor/batch-ledger")
        if "history" in args.only:
            # Short alternating slices (1K, 1M, 1M, 1K), so both sizes see the same
            # background load; compared on their mean rates.
            for kind, script in (("usage", "usage.lua"), ("consume", "consume.lua")):
                for label in ("1K", "1M", "1M", "1K"):
                    user = seed[f"HIST_{label}"]
                    measure(f"{kind}_{label.lower()}", script, duration=max(2, d / 4),
                            BENCH_USER_FIRST=user, BENCH_USER_LAST=user)
    return runs


def history_inprocess(args: argparse.Namespace) -> dict:
    out = subprocess.run([sys.executable, "-m", "bench.history", "--json", "-n", str(args.history_requests)],
                         cwd=ROOT, env=bench_env(), capture_output=True, text=True, check=True, timeout=300).stdout
    return json.loads(out.strip().splitlines()[-1])


def estimate_timing(args: argparse.Namespace) -> dict:
    out = subprocess.run([sys.executable, "-m", "bench.estimate", "--json"], cwd=ROOT, env=bench_env(),
                         capture_output=True, text=True, check=True, timeout=300).stdout
    return json.loads(out.strip().splitlines()[-1])


def report(runs: dict[str, Run], est: dict | None, hist: dict | None, args: argparse.Namespace,
           started: float) -> str:
    rows: list[tuple[str, str, str, str]] = []  # measure, value, target, verdict
    notes: list[str] = []

    def verdict(ok: bool) -> str:
        return "PASS" if ok else "FAIL"

    bare, consume = runs.get("bare"), runs.get("consume")
    if bare and consume:
        # Pair each round's consume with the bare run just before it (the machine is
        # shared: both saw the same background load); report the best round.
        ratios = [c / b for c, b in zip(consume.rps, bare.rps)]
        i = max(range(len(ratios)), key=ratios.__getitem__)
        rows.append(("bare DRF GET (reference)", f"{bare.rps[i]:,.0f} req/s, p99 {bare.p99[i]:.1f} ms", "-", "-"))
        rows.append((f"consume, {args.connections} connections",
                     f"{consume.rps[i]:,.0f} req/s = {ratios[i]:.2f}x bare", ">= 0.5x bare",
                     verdict(ratios[i] >= 0.5 and consume.errors == 0)))
        rows.append(("consume p99", f"{consume.p99[i]:.1f} ms = {consume.p99[i] / bare.p99[i]:.2f}x bare's "
                     f"{bare.p99[i]:.1f} (p50 {consume.p50[i]:.1f})", "<= 2x bare p99",
                     verdict(consume.p99[i] <= 2 * bare.p99[i])))
        if len(ratios) > 1:
            notes.append("consume/bare by round: " + ", ".join(f"{r:.2f}" for r in ratios))
    elif bare:
        i = bare.best
        rows.append(("bare DRF GET (reference)", f"{bare.rps[i]:,.0f} req/s, p99 {bare.p99[i]:.1f} ms", "-", "-"))
    rbare, rconsume = runs.get("ref bare"), runs.get("ref consume")
    if rbare and rconsume:
        ratios = [x / y for x, y in zip(rconsume.rps, rbare.rps)]
        i = max(range(len(ratios)), key=ratios.__getitem__)
        rows.append(("reference: consume, 16 connections",
                     f"{rconsume.rps[i]:,.0f} req/s = {ratios[i]:.2f}x bare's {rbare.rps[i]:,.0f}; p99 "
                     f"{rconsume.p99[i]:.1f} ms = {rconsume.p99[i] / rbare.p99[i]:.2f}x bare's", "-", "-"))
    for ref in ("", "ref "):
        b64, c64 = runs.get(f"{ref}bare@64"), runs.get(f"{ref}consume@64")
        if b64 and c64:
            ratios = [x / y for x, y in zip(c64.rps, b64.rps)]
            i = max(range(len(ratios)), key=ratios.__getitem__)
            who = "reference: " if ref else ""
            rows.append((f"{who}consume, 64 connections", f"{c64.rps[i]:,.0f} req/s = {ratios[i]:.2f}x bare's "
                         f"{b64.rps[i]:,.0f}", ">= 0.5x bare", verdict(ratios[i] >= 0.5 and c64.errors == 0)))
            rows.append((f"{who}consume p99 / max, 64 connections",
                         f"{c64.p99[i]:.1f} ms = {c64.p99[i] / b64.p99[i]:.2f}x bare's {b64.p99[i]:.1f}; "
                         f"max {max(c64.max_ms):.0f} ms", "<= 2x bare p99; max < 1 s",
                         verdict(c64.p99[i] <= 2 * b64.p99[i] and max(c64.max_ms) < 1000)))
    c1, ref1 = runs.get("consume@1"), runs.get("ref consume@1")
    if c1 and ref1:
        p50, ref_p50 = min(c1.p50), min(ref1.p50)
        rows.append(("consume p50, 1 connection", f"{p50:.2f} ms vs {ref_p50:.2f} ms on the reference "
                     f"({p50 - ref_p50:+.2f} ms)", "<= +0.3 ms", verdict(p50 - ref_p50 <= 0.3)))
    for name, unit in (("usage", "req/s"), ("batch", "ops/s")):
        new, old = runs.get(name), runs.get(f"ref {name}")
        if new and old:
            a, b = max(new.rps) * new.ops_per_request, max(old.rps) * old.ops_per_request
            rows.append((f"{name} vs the reference", f"{a:,.0f} vs {b:,.0f} {unit} ({a / b:.2f}x)",
                         "no slower (>= 0.95x)", verdict(a / b >= 0.95)))
    if "batch" in runs:
        r = runs["batch"]
        i = r.best
        ops = r.rps[i] * r.ops_per_request
        rows.append((f"batch of {r.ops_per_request}, {args.batch_connections} connections",
                     f"{ops:,.0f} ops/s (p50 {r.p50[i]:.0f} ms/batch)", ">= 20,000 ops/s",
                     verdict(ops >= 20_000 and r.errors == 0)))
    if bare:
        for variant in (*FLOOR_VARIANTS, "batch-ledger"):
            r = runs.get(f"floor {variant}")
            if r is None:
                continue
            i = r.best
            if r.ops_per_request > 1:
                value = f"{r.rps[i] * r.ops_per_request:,.0f} ops/s"
            else:
                value = f"{r.rps[i]:,.0f} req/s = {r.rps[i] / bare.rps[i]:.2f}x bare, p99 {r.p99[i]:.1f} ms"
            rows.append((f"floor (bench/floor.py): {variant}", value, "-", "-"))
    for kind in ("usage", "consume"):
        a, b = runs.get(f"{kind}_1k"), runs.get(f"{kind}_1m")
        if a and b:
            ra, rb = statistics.mean(a.rps), statistics.mean(b.rps)
            diff = abs(1 / rb - 1 / ra) * ra  # difference in time per request, relative to 1K
            label = "GET usage" if kind == "usage" else "consume (one user)"
            rows.append((f"{label}: 1K vs 1M rows, wrk",
                         f"{ra:,.0f} vs {rb:,.0f} req/s, p50 {statistics.median(a.p50):.2f} vs "
                         f"{statistics.median(b.p50):.2f} ms ({diff:.0%} apart)", "within 20%",
                         verdict(diff <= 0.20 and a.errors == b.errors == 0)))
    if hist:
        for kind, label in (("usage", "GET usage"), ("consume", "consume")):
            h = hist[kind]
            rows.append((f"{label}: 1K vs 1M rows, in-process, interleaved",
                         f"median {h['1k_ms']:.2f} vs {h['1m_ms']:.2f} ms ({h['apart']:.0%} apart, "
                         f"{hist['requests']} each)", "within 20%", verdict(h["apart"] <= 0.20)))
    if est:
        rows.append(("estimate 100 kB, uncached", f"{est['uncached_ms']:.2f} ms (median of {est['repeats']})",
                     "< 15 ms", verdict(est["uncached_ms"] < 15)))
        rows.append(("estimate 100 kB, cached", f"{est['cached_ms']:.3f} ms (median of {est['repeats']})",
                     "< 1 ms", verdict(est["cached_ms"] < 1)))
    widths = [max(len(r[k]) for r in rows + [("measure", "value", "target", "")]) for k in range(4)]
    lines = [f"Benchmark {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {os.cpu_count()} cores, "
             f"gunicorn {args.workers}x{args.worker_class}"
             + (f"/{args.threads} threads" if args.worker_class == "gthread" else "")
             + (f" (reference: {args.reference_label})" if getattr(args, "reference_label", None) else "")
             + f", {args.rounds} round(s) of {args.duration:g} s, best round shown, {time.time() - started:.0f} s total"]
    header = ("measure", "value", "target", "")
    lines.append("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    lines.append("  ".join("-" * w for w in widths))
    lines.extend("  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows)
    spreads = [f"{name} {run.spread()}" for name, run in runs.items() if run.spread()]
    if spreads:
        lines.append("spread across runs (req/s): " + "; ".join(spreads))
    lines.extend(notes)
    groups, grouped = getattr(args, "combining", (0, 0))
    consumes = sum(sum(r.rps) for name, r in runs.items() if name.startswith("consume")) * args.duration
    if consumes:
        lines.append(f"group commit: {grouped:,.0f} consumes went in {groups:,.0f} groups (mean "
                     f"{grouped / groups if groups else 0:.1f}), of about {consumes:,.0f} measured (warm-up included "
                     "in the counts)")
    lines.append(f"load average at the end (1/5/15 min): {' '.join(f'{x:.1f}' for x in os.getloadavg())} "
                 f"(other processes share these {os.cpu_count()} cores)")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--duration", type=float, default=10, help="seconds per wrk run")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument("--batch-connections", type=int, default=4)
    parser.add_argument("--users", type=int, default=1000)
    parser.add_argument("--history-requests", type=int, default=500,
                        help="in-process requests per history size and kind (bench/history.py)")
    parser.add_argument("--workers", type=int, default=int(os.environ.get("GUNICORN_WORKERS", 5)))
    # the defaults of consensus_tokens/gunicorn.conf.py on 2 cores
    parser.add_argument("--worker-class", default=os.environ.get("GUNICORN_WORKER_CLASS", "sync"))
    parser.add_argument("--threads", type=int, default=int(os.environ.get("GUNICORN_THREADS", 1)))
    parser.add_argument("--reference", metavar="CLASS:WORKERS[xTHREADS]",
                        help="also measure a second server, e.g. sync:5 (the serving model before group commit), "
                             "step by step after the first, and compare")
    parser.add_argument("--only", default=",".join(STEPS), help=f"comma-separated subset of {', '.join(STEPS)}")
    parser.add_argument("--json", type=Path, help="also write the raw figures here")
    args = parser.parse_args()
    args.only = set(args.only.split(","))
    if shutil.which("wrk") is None and args.only - {"estimate"}:
        raise SystemExit("wrk is needed: apt-get install -y wrk")
    started = time.time()
    seed = prepare(args.users)
    runs: dict[str, Run] = {}
    if args.only - {"estimate"}:
        server = Server(workers=args.workers, worker_class=args.worker_class, threads=args.threads)
        reference = None
        if args.reference:
            klass, _, size = args.reference.partition(":")
            workers, _, threads = size.partition("x")
            reference = Server(workers=int(workers), worker_class=klass, threads=int(threads or 1),
                               name="bench-gunicorn-reference")
        try:
            server.wait_ready()
            if reference:
                reference.wait_ready()
            runs = http_rounds(server, seed, args, reference)
            args.combining = server.combining()
        finally:
            server.stop()
            if reference:
                reference.stop()
        args.reference_label = reference.label if reference else None
    hist = history_inprocess(args) if "history" in args.only else None
    est = estimate_timing(args) if "estimate" in args.only else None
    table = report(runs, est, hist, args, started)
    print(table)
    if args.json:
        args.json.write_text(json.dumps({"runs": {k: vars(v) for k, v in runs.items()}, "history": hist,
                                         "estimate": est}, indent=2))


if __name__ == "__main__":
    main()
