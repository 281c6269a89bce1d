"""The client as a package: `pip install ./clients/python` in a fresh virtualenv (no Django there),
its README's quickstart run as written against a live server; and its pure parts (retry waits,
Retry-After, error mapping) on their own."""
from __future__ import annotations

import os
import random
import re
import shutil
import subprocess
import sys
import tomllib
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

import pytest

import consensus_tokens_client
from consensus_tokens_client import (ConsensusTokensError, RateLimited, RetryPolicy, ServiceUnavailable,
                                     TokenCapExceeded)
from consensus_tokens_client.errors import error_from_answer
from consensus_tokens_client.protocol import history_page
from consensus_tokens_client.retry import parse_retry_after
from metering.models import LedgerEntry
from metering.services import usage_get

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "clients" / "python"


def quickstart() -> str:
    """The README's first Python block, as a user would paste it."""
    readme = (PACKAGE / "README.md").read_text()
    return re.search(r"```python\n(.*?)```", readme, re.S).group(1)


@pytest.mark.integration
@pytest.mark.within_one_period
@pytest.mark.django_db(transaction=True)
def test_pip_install_in_a_fresh_virtualenv_and_the_quickstart_runs(tmp_path, server, service_key, make_user):
    make_user("pro", id=42)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    source = tmp_path / "python"  # a copy: pip builds in the folder it is given, and the checkout stays clean
    shutil.copytree(PACKAGE, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    install = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", str(source)], env=env,
                             capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stdout + install.stderr
    script = tmp_path / "quickstart.py"
    script.write_text(quickstart())
    run = subprocess.run([str(venv / "bin" / "python"), str(script)], capture_output=True, text=True, timeout=60,
                         env={**env, "CONSENSUS_TOKENS_URL": server.url, "CONSENSUS_TOKENS_API_KEY": service_key})
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.strip() == "used 1234 of 50000; overage so far 0 USD"
    [entry] = LedgerEntry.objects.filter(kind="consumption", account__user_id=42)
    assert entry.used_delta == 1234 and entry.estimated_tokens > 500 and usage_get(user_id=42).reserved == 0

    no_django = subprocess.run([str(venv / "bin" / "python"), "-c",
                                "import sys, consensus_tokens_client; import django"], capture_output=True,
                               text=True, env=env)
    assert "ModuleNotFoundError: No module named 'django'" in no_django.stderr


def test_the_version_is_the_distribution_s():
    meta = tomllib.loads((PACKAGE / "pyproject.toml").read_text())["project"]
    assert consensus_tokens_client.__version__ == meta["version"]
    assert meta["name"] == "consensus-tokens-client" and meta["dependencies"] == ["httpx>=0.27,<1"]
    assert (PACKAGE / "src" / "consensus_tokens_client" / "py.typed").exists()


def test_waits_grow_exponentially_with_full_jitter_and_honour_retry_after():
    policy = RetryPolicy(attempts=6, backoff=0.1, max_backoff=1.0)
    rng = random.Random(7)
    for retry, ceiling in [(1, 0.1), (2, 0.2), (3, 0.4), (4, 0.8), (5, 1.0), (9, 1.0)]:
        waits = [policy.wait(retry, rng=rng) for _ in range(200)]
        assert 0 <= min(waits) and max(waits) <= ceiling and max(waits) > ceiling * 0.8
    assert all(2.0 <= policy.wait(1, 2.0, rng=rng) <= 2.1 for _ in range(50))  # never before Retry-After
    assert policy.retries_status(503, 2.0) and policy.retries_status(500, None) and policy.retries_status(429, 30)
    assert not policy.retries_status(429, 31) and not policy.retries_status(402, None)
    assert not policy.retries_status(409, None) and not policy.retries_status(400, None)
    with pytest.raises(ValueError):
        RetryPolicy(attempts=0)


def test_retry_after_in_seconds_or_as_an_http_date():
    now = datetime(2031, 3, 4, 12, 0, 0, tzinfo=timezone.utc)
    assert parse_retry_after("120") == 120.0 and parse_retry_after(" 1.5 ") == 1.5
    assert parse_retry_after("Tue, 04 Mar 2031 12:00:30 GMT", now=now) == 30.0
    assert parse_retry_after("Tue, 04 Mar 2031 11:00:00 GMT", now=now) == 0.0
    assert parse_retry_after(None) is None and parse_retry_after("soon") is None


def test_error_answers_become_the_class_named_after_their_code():
    cap = error_from_answer(402, {"error": {"code": "token_cap_exceeded", "message": "No room.", "available": 12,
                                            "cap": 15_000}}, request_id="r1", retry_after=None)
    assert type(cap) is TokenCapExceeded and (cap.available, cap.cap, cap.request_id) == (12, 15_000, "r1")
    limited = error_from_answer(429, {"error": {"code": "rate_limited", "message": "Slow down."}},
                                request_id=None, retry_after=42.0)
    assert type(limited) is RateLimited and limited.retry_after == 42.0
    newer = error_from_answer(400, {"error": {"code": "a_code_from_the_future", "message": "?"}}, request_id=None,
                              retry_after=None)
    assert type(newer) is ConsensusTokensError and newer.code == "a_code_from_the_future"
    gateway = error_from_answer(503, None, request_id=None, retry_after=None)
    assert type(gateway) is ServiceUnavailable and gateway.status == 503
    invalid = error_from_answer(400, {"error": {"code": "invalid_request", "message": "Invalid input.",
                                                "fields": {"tokens": ["Must be positive."]}}},
                                request_id=None, retry_after=None)
    assert invalid.fields == {"tokens": ["Must be positive."]} and "invalid_request" in str(invalid)


def test_history_bounds_must_be_aware_and_dates_are_whole_days():
    with pytest.raises(ValueError, match="timezone-aware"):
        history_page(user_id=1, since=datetime(2031, 1, 1), until=None, operation_type=None, kind=None,
                     page_size=None, cursor=None)
    call = history_page(user_id=1, since=date(2031, 1, 1), until=datetime(2031, 1, 2, tzinfo=timezone(timedelta(
        hours=2))), operation_type=None, kind="consumption", page_size=10, cursor=None)
    assert call.params == {"userId": "1", "kind": "consumption", "pageSize": "10", "from": "2031-01-01",
                           "to": "2031-01-02T00:00:00+02:00"}


def test_the_client_type_checks_strictly(tmp_path):
    """The package ships py.typed: its own annotations must hold (mypy --strict, no Django stubs needed)."""
    done = subprocess.run([sys.executable, "-m", "mypy", "--strict", "--cache-dir", str(tmp_path / "cache"),
                           str(PACKAGE / "src" / "consensus_tokens_client")], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
