"""A real Celery worker and beat on a real Redis broker and the test PostgreSQL
database, e-mail delivered to a real SMTP server started here.

The broker is a throwaway redis-server of this test, so it can be stopped: an
alert recorded while the broker is down is still delivered once it is back (by
the periodic resend job that beat schedules)."""
from __future__ import annotations

import email
import email.policy
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import quote

import kombu.pools
import pytest
from aiosmtpd.controller import Controller
from django.conf import settings
from django.core.management import call_command
from django.db import connection

from alerts.models import AlertEvent
from consensus_tokens.celery import app as celery_app

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True), pytest.mark.within_one_period]
PROJECT = Path(settings.BASE_DIR)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate, *, timeout: float, what: str, step: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


class Inbox:
    """aiosmtpd handler: keeps every message it is given."""

    def __init__(self) -> None:
        self.messages: list[email.message.EmailMessage] = []
        self._lock = threading.Lock()

    async def handle_DATA(self, server, session, envelope):
        message = email.message_from_bytes(envelope.original_content or envelope.content, policy=email.policy.default)
        with self._lock:
            self.messages.append(message)
        return "250 Message accepted for delivery"

    def subjects(self) -> list[str]:
        with self._lock:
            return [str(m["subject"]) for m in self.messages]


@pytest.fixture
def smtp():
    inbox = Inbox()
    controller = Controller(inbox, hostname="127.0.0.1", port=free_port())
    controller.start()
    yield controller.port, inbox
    controller.stop()


class Broker:
    """A redis-server of our own that the test can stop and start again."""

    def __init__(self, binary: str, port: int, workdir: Path) -> None:
        self.binary, self.port, self.workdir, self.process = binary, port, workdir, None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.workdir)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(self._answers, timeout=10, what="redis-server to answer")

    def _answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)
        self.process = None


@pytest.fixture
def broker(tmp_path):
    binary = os.environ.get("CT_REDIS_SERVER") or shutil.which("redis-server") or "/usr/bin/redis-server"
    if not Path(binary).exists():
        pytest.fail("no redis-server binary (set CT_REDIS_SERVER; scripts/test.sh provides one)")
    server = Broker(binary, free_port(), tmp_path)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def publish_to(broker):
    """This process (the API) publishes tasks to the broker instead of running them eagerly."""
    saved = {key: celery_app.conf[key] for key in ("task_always_eager", "broker_url")}
    celery_app.conf.update(task_always_eager=False, broker_url=broker.url, broker_connection_timeout=1)
    _fresh_connections()
    yield
    _fresh_connections()
    celery_app.conf.update(**saved)


def _fresh_connections() -> None:
    """Forget pooled broker connections (kombu keeps them in global pools)."""
    kombu.pools.reset()
    celery_app._pool = None
    celery_app.amqp._producer_pool = None


def database_url() -> str:
    db = connection.settings_dict
    auth = quote(db["USER"] or "") + (f":{quote(db['PASSWORD'])}" if db.get("PASSWORD") else "")
    return f"postgres://{auth}@{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}/{db['NAME']}"


@pytest.fixture
def celery_processes(transactional_db, broker, smtp, tmp_path):
    """`celery -A consensus_tokens worker` and `beat` (database scheduler) on the
    test database, the broker above and the SMTP server above."""
    smtp_port, _ = smtp
    settings.ALERTS_RESEND_EVERY_SECONDS = 2
    call_command("setup_periodic_tasks", "--reset", stdout=open(os.devnull, "w"))
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "consensus_tokens.settings.local", "DEBUG": "false",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(PROJECT), os.environ.get("PYTHONPATH")])), "DATABASE_URL": database_url(), "DB_CONN_MAX_AGE": "0",
           "REDIS_URL": settings.REDIS_URL, "CELERY_BROKER_URL": broker.url, "CELERY_TASK_ALWAYS_EAGER": "false",
           "EMAIL_URL": f"smtp://127.0.0.1:{smtp_port}", "ALERTS_RESEND_GRACE_SECONDS": "1",
           "LOG_LEVEL": "INFO"}
    celery = [sys.executable, "-m", "celery", "-A", "consensus_tokens"]
    commands = {
        "worker": celery + ["worker", "--pool=solo", "--without-heartbeat", "--without-gossip", "--without-mingle",
                            "-l", "info", "-n", f"alerts-it-{os.getpid()}@%h"],
        "beat": celery + ["beat", "-l", "info", "-S", "django_celery_beat.schedulers:DatabaseScheduler",
                          "--max-interval", "1", "--pidfile", str(tmp_path / "beat.pid")],
    }
    logs, processes = {}, {}
    for name, command in commands.items():
        logs[name] = open(tmp_path / f"{name}.log", "w+")
        processes[name] = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=logs[name],
                                           stderr=subprocess.STDOUT, start_new_session=True)
    yield processes
    for process in processes.values():
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
    for name, process in processes.items():
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=5)
        logs[name].seek(0)
        output = logs[name].read()
        logs[name].close()
        if os.environ.get("ALERTS_IT_LOGS"):
            sys.stderr.write(f"\n--- {name} ---\n{output[-6000:]}\n")


def test_alerts_delivered_by_a_real_worker_and_after_a_broker_outage(api, make_user, smtp, broker, publish_to,
                                                                     celery_processes):
    started = time.monotonic()
    _, inbox = smtp
    user = make_user("basic")  # limit 10,000

    def consume(tokens: int, op: str) -> None:
        response = api.post("/api/tokens/consume", {"userId": user.pk, "operationId": op, "tokens": tokens,
                                                    "operationType": "summary"}, format="json")
        assert response.status_code == 201, response.content

    consume(7_400, "it-1")
    consume(200, "it-2")  # 75%: recorded in the consume's transaction, published after its commit
    wait_until(lambda: any("75%" in s for s in inbox.subjects()), timeout=30, what="the 75% e-mail")
    [message] = inbox.messages
    assert message["to"] == user.email
    text = message.get_body(("plain",)).get_content()
    html = message.get_body(("html",)).get_content()
    assert "7,600 of 10,000 tokens (76%)" in text and "/dashboard/" in html and "/alerts/unsubscribe/" in text

    broker.stop()
    consume(1_500, "it-3")  # 91%: the API still answers; the alert waits in the database
    ninety = AlertEvent.objects.get(account__user=user, threshold=90)
    assert ninety.status == AlertEvent.Status.PENDING and ninety.sent_at is None
    time.sleep(1.5)
    assert not any("90%" in s for s in inbox.subjects())

    broker.start()
    wait_until(lambda: any("90%" in s for s in inbox.subjects()), timeout=40,
               what="the 90% e-mail after the broker came back")
    # the worker marks it sent just after the SMTP server accepted it
    wait_until(lambda: AlertEvent.objects.filter(pk=ninety.pk, status=AlertEvent.Status.SENT).exists(), timeout=10,
               what="the 90% alert marked sent")
    ninety.refresh_from_db()
    assert ninety.attempts == 1 and ninety.sent_at is not None
    time.sleep(2.5)  # a few more resend runs: nothing is sent twice
    assert sorted(inbox.subjects()) == ["You have used 75% of your tokens this period",
                                        "You have used 90% of your tokens this period"]
    assert time.monotonic() - started < 60
