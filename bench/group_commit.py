"""What group commit saves per consume: the single statement (consume_single.sql) against
groups of N (consume_group.sql), run in this process on one connection, as the combiner
runs them. Reports, per consume, this process's CPU and its PostgreSQL backend's CPU,
and the ratio of each group size to the single statement measured in the same run
(interleaved rounds, so both see the same background load).

    DJANGO_SETTINGS_MODULE=bench.settings python -m bench.group_commit [--consumes 4000] [--rounds 3]

Run bench/run.py once first (it creates, migrates and seeds bench_consensus).
"""
from __future__ import annotations

import argparse
import json
import os
import time

import django

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "bench.settings")
django.setup()

from metering.models import Account  # noqa: E402
from metering.services import ConsumeRequest, RequestContext  # noqa: E402
from metering.services.consume.postgres import consume_fast, consume_group_fast  # noqa: E402

from bench.inprocess import _postgres_cpu_reader  # noqa: E402
from bench.seed import LOAD_PREFIX  # noqa: E402

CTX = RequestContext(service_key_id=None, client_ip="127.0.0.1", user_agent="bench", request_id="bench")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--consumes", type=int, default=4000, help="per group size and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sizes", default="1,4,16,64")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    users = list(Account.objects.filter(user__username__startswith=LOAD_PREFIX).values_list("user_id", flat=True))
    pg_cpu = _postgres_cpu_reader()
    run = f"{time.time_ns()}"
    sizes = [int(s) for s in args.sizes.split(",")]
    best: dict[int, tuple[float, float]] = {}
    n = 0
    for _ in range(args.rounds):
        for size in sizes:
            requests = []
            for _ in range(args.consumes):
                n += 1
                requests.append(ConsumeRequest(user_id=users[n % len(users)], operation_id=f"g-{run}-{n}",
                                               tokens=1, operation_type="summary", provider="openai",
                                               model="gpt-4o", estimated_tokens=1))
            cpu0, pg0 = time.process_time(), pg_cpu()
            if size == 1:
                for r in requests:
                    assert consume_fast(request=r, ctx=CTX) is not None
            else:
                for i in range(0, len(requests), size):
                    answers = consume_group_fast([(r, CTX) for r in requests[i:i + size]])
                    assert all(a is not None for a in answers)
            here = (time.process_time() - cpu0) / len(requests) * 1e3
            backend = (pg_cpu() - pg0) / len(requests) * 1e3
            if size not in best or here + backend < sum(best[size]):
                best[size] = (here, backend)
    single = sum(best[1])
    rows = {size: {"python_ms": here, "postgres_ms": backend, "ratio": (here + backend) / single}
            for size, (here, backend) in best.items()}
    if args.json:
        print(json.dumps(rows))
        return
    print(f"per consume, best of {args.rounds} rounds of {args.consumes} (tokens=1, users spread over {len(users)}):")
    for size, row in rows.items():
        label = "single statement" if size == 1 else f"group of {size}"
        print(f"  {label:>17}: {row['python_ms']:.3f} ms here + {row['postgres_ms']:.3f} ms PostgreSQL "
              f"= {row['ratio']:.2f}x the single statement")


if __name__ == "__main__":
    main()
