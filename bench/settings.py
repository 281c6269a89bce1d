"""Settings for the benchmark only: the production settings (DEBUG off, JSON
request logs, rate limits, persistent connections) on their own PostgreSQL
database (bench_consensus) and Redis db 9, plus bench/urls.py, which adds a bare
DRF endpoint to measure the framework's own ceiling against.

Plain HTTP on loopback stands in for the load balancer that terminates TLS, so
the HTTPS redirect is off; Stripe is never called by the measured endpoints."""
import os

os.environ.setdefault("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/bench_consensus")
os.environ.setdefault("REDIS_URL", "redis://127.0.0.1:6379/9")
os.environ.setdefault("SECRET_KEY", "bench-only-secret-key-0123456789abcdefghijklmnopqrstuvwxyz")
os.environ.setdefault("ALLOWED_HOSTS", "127.0.0.1,localhost")
os.environ.setdefault("STRIPE_SECRET_KEY", "sk_test_bench_never_called")
os.environ.setdefault("SECURE_SSL_REDIRECT", "false")
os.environ.setdefault("CELERY_TASK_ALWAYS_EAGER", "false")

from consensus_tokens.settings.production import *  # noqa: E402,F401,F403
from consensus_tokens.settings.production import BASE_DIR, DATABASES, env  # noqa: E402

ROOT_URLCONF = "bench.urls"
# Persistent connections as in production (base: DB_CONN_MAX_AGE, 60 s by default).
DATABASES["default"]["CONN_MAX_AGE"] = env.int("DB_CONN_MAX_AGE", default=600)
TIKTOKEN_CACHE_DIR = env("TIKTOKEN_CACHE_DIR", default=str(BASE_DIR / ".cache" / "tiktoken"))
