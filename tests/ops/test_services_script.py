"""scripts/services.sh, which the test command sources: a PostgreSQL on the standard port is used
only while it has room for the suite's races; one that other clients fill gets a throwaway server
of ours instead (issue: five concurrency tests answered 503 on a shared server with 45 of 100
connections taken)."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import psycopg
import pytest

ROOT = Path(__file__).resolve().parents[2]


def _ensure(probe_port: int, min_free: int) -> dict[str, str]:
    """Run ct_services_ensure as scripts/test.sh does, with DATABASE_URL unset; report the URL it
    chose and the max_connections of the server behind it, then stop what it started."""
    script = """
source scripts/services.sh
trap ct_services_stop EXIT
ct_services_ensure
echo "URL=$DATABASE_URL"
python -c 'import os, psycopg
with psycopg.connect(os.environ["DATABASE_URL"]) as c:
    print("MAX=" + c.execute("show max_connections").fetchone()[0])'
"""
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    env.update(PG_PROBE_PORT=str(probe_port), CT_PG_MIN_FREE_CONNECTIONS=str(min_free))
    done = subprocess.run(["bash", "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    answers = dict(line.split("=", 1) for line in done.stdout.splitlines() if "=" in line)
    answers["log"] = done.stderr
    return answers


@pytest.mark.integration
def test_a_crowded_server_gets_a_throwaway_one_and_a_roomy_one_is_used(postgres_cluster):
    postgres_cluster.psql("-d", "postgres", "-c", "CREATE DATABASE test")
    url = f"postgres://postgres@127.0.0.1:{postgres_cluster.port}/test"
    others = [psycopg.connect(url) for _ in range(35)]  # 60 - 3 reserved - 35 = 22 free
    try:
        crowded = _ensure(postgres_cluster.port, min_free=30)
        assert f":{postgres_cluster.port}/" not in crowded["URL"]
        assert "has 22 connections free, the suite needs 30" in crowded["log"]
        assert int(crowded["MAX"]) >= 200  # ours has room for the races
    finally:
        for conn in others:
            conn.close()

    roomy = _ensure(postgres_cluster.port, min_free=30)
    assert roomy["URL"] == url
    assert roomy["MAX"] == "60"
    assert "connections free)" in roomy["log"]
