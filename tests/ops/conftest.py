"""Helpers for the operations tests: real servers started for a test and stopped after.

`run_gunicorn` runs the app under gunicorn with the production config file
(consensus_tokens/gunicorn.conf.py, as docker-compose does; the command line sets
the port and worker count) against the test database, so the test must be
transactional: the server only sees committed rows. `redis_server` and `postgres_cluster` start throwaway servers the test may
stop or restart; the shared PostgreSQL and Redis are never touched.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import requests
from django.conf import settings
from django.db import connection

from consensus_tokens import ratelimit
from metering import throttling

ROOT = Path(__file__).resolve().parents[2]
# scripts/test.sh says where the server binaries are and whom to run them as (see scripts/services.sh).
PG_BIN = Path(os.environ.get("CT_PG_BINDIR") or "/usr/lib/postgresql/15/bin")
PG_USER = os.environ.get("CT_PG_USER", "postgres")


@pytest.fixture(autouse=True)
def _fresh_rate_limit_state():
    """Each test starts with no cached tier limits and the store's breaker closed."""
    throttling.tier_limits.clear()
    ratelimit._breaker.open_until = 0.0
    ratelimit._breaker.last_warning = 0.0
    yield
    throttling.tier_limits.clear()
    ratelimit._breaker.open_until = 0.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except Exception:  # noqa: BLE001 - not up yet
            pass
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def database_url(name: str | None = None, port: int | None = None) -> str:
    port = port or connection.settings_dict["PORT"] or 5432
    return f"postgres://postgres@127.0.0.1:{port}/{name or connection.settings_dict['NAME']}"


@dataclass
class Server:
    url: str
    process: subprocess.Popen
    log_path: Path
    metrics_dir: Path
    env: dict[str, str] = field(default_factory=dict)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def worker_pids(self) -> list[int]:
        out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(self.process.pid)], capture_output=True, text=True)
        return [int(p) for p in out.stdout.split()]


@contextmanager
def run_gunicorn(*, workers: int = 2, threads: int = 4, env: dict[str, str] | None = None,
                 timeout: float = 30) -> Iterator[Server]:
    port = free_port()
    tmp = Path(tempfile.mkdtemp(prefix="ct-ops-gunicorn-"))
    metrics_dir = tmp / "metrics"
    metrics_dir.mkdir()
    log_path = tmp / "server.log"
    full_env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "consensus_tokens.settings.test",
        "DATABASE_URL": database_url(),
        "REDIS_URL": settings.REDIS_URL,
        "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
        "CELERY_TASK_ALWAYS_EAGER": "true",
        "PYTHONUNBUFFERED": "1",
        **(env or {}),
    }
    log = open(log_path, "wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "consensus_tokens.wsgi:application", "-b", f"127.0.0.1:{port}",
         "-w", str(workers), "-k", "gthread", "--threads", str(threads), "--timeout", "30",
         "--graceful-timeout", "2", "-c", str(ROOT / "consensus_tokens" / "gunicorn.conf.py")],
        cwd=ROOT, env=full_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    server = Server(url=f"http://127.0.0.1:{port}", process=process, log_path=log_path, metrics_dir=metrics_dir,
                    env=full_env)
    try:
        wait_for(lambda: requests.get(server.url + "/health/live", timeout=1).status_code == 200, timeout,
                 "gunicorn to answer")
        wait_for(lambda: len(server.worker_pids()) >= workers, 10, "gunicorn workers")
        yield server
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=5)
        log.close()
        # Workers close their connections as they exit; make sure none outlives the test,
        # or the test database could not be flushed or dropped.
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def run_redis() -> Iterator[tuple[int, subprocess.Popen]]:
    """A throwaway redis-server on a free port, without persistence."""
    port = free_port()
    process = subprocess.Popen([os.environ.get("CT_REDIS_SERVER") or "/usr/bin/redis-server", "--port", str(port),
                                "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: port_open(port), 10, "redis-server")
        yield port, process
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=5)


class PostgresCluster:
    """A throwaway PostgreSQL 15 cluster in a temp dir, run as the postgres user."""

    def __init__(self) -> None:
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="ct-ops-pg-"))
        os.chmod(self.dir, 0o777)
        self.data = self.dir / "data"

    def _as_postgres(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        command = ["runuser", "-u", PG_USER, "--", *args] if PG_USER else list(args)
        return subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=True)

    def init(self) -> None:
        self._as_postgres(str(PG_BIN / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres",
                          "--no-sync", "-E", "UTF8")
        with open(self.data / "postgresql.conf", "a") as conf:
            conf.write(f"\nport = {self.port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{self.dir}'\n"
                       "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\nmax_connections = 60\n")

    def start(self) -> None:
        self._as_postgres(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-l", str(self.dir / "server.log"),
                          "-w", "-t", "30", "start")

    def stop(self) -> None:
        self._as_postgres(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "-t", "30", "stop")

    def psql(self, *args: str, **kwargs: Any) -> subprocess.CompletedProcess:
        return subprocess.run([str(PG_BIN / "psql"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres",
                               "-v", "ON_ERROR_STOP=1", "-q", *args], capture_output=True, text=True, check=True,
                              **kwargs)

    def destroy(self) -> None:
        try:
            if (self.data / "postmaster.pid").exists():
                self.stop()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def postgres_cluster():
    if not (PG_BIN / "initdb").exists() or shutil.which("runuser") is None:
        pytest.fail("PostgreSQL 15 server binaries (initdb, pg_ctl) and runuser are needed for this test")
    cluster = PostgresCluster()
    cluster.init()
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.destroy()


def clone_test_database(cluster: PostgresCluster, name: str = "ct_fault") -> str:
    """Copy the test database (schema and committed rows) into the throwaway cluster."""
    cluster.psql("-d", "postgres", "-c", f"CREATE DATABASE {name}")
    source = connection.settings_dict
    dump = subprocess.run([str(PG_BIN / "pg_dump"), "-h", source["HOST"] or "127.0.0.1",
                           "-p", str(source["PORT"] or 5432), "-U", source["USER"] or "postgres", "--no-owner",
                           "--no-privileges", source["NAME"]], capture_output=True, check=True, timeout=60)
    cluster.psql("-d", name, input=dump.stdout.decode())
    return database_url(name, cluster.port)


@dataclass
class Load:
    """Clients calling the server in threads until stopped; each operation is retried
    with the same body until it gets a final answer, as a well-behaved client does."""

    results: dict[str, tuple[int, dict]] = field(default_factory=dict)
    transient: list[tuple[int, Any]] = field(default_factory=list)
    errors: list[BaseException] = field(default_factory=list)


def post_until_final(session: requests.Session, url: str, body: dict, headers: dict, load: Load,
                     deadline: float) -> tuple[int, dict]:
    while time.monotonic() < deadline:
        try:
            response = session.post(url, json=body, headers=headers, timeout=10)
        except requests.RequestException as error:  # connection reset by a killed worker, server down
            load.transient.append((0, type(error).__name__))
            time.sleep(0.05)
            continue
        if response.status_code in (502, 503, 504):
            load.transient.append((response.status_code, response.json() if response.headers.get(
                "Content-Type", "").startswith("application/json") else response.text[:200]))
            time.sleep(0.05)
            continue
        return response.status_code, response.json()
    raise AssertionError(f"no final answer for {body.get('operationId')} before the deadline")


def run_threads(count: int, target: Callable[[int], None]) -> list[threading.Thread]:
    threads = [threading.Thread(target=target, args=(i,), daemon=True) for i in range(count)]
    for t in threads:
        t.start()
    return threads
