"""Tests: real PostgreSQL and Redis, fast password hashing, e-mail kept in memory,
Celery eager unless a test starts a real worker.

DATABASE_URL / REDIS_URL come from the caller (scripts/test.sh provisions them
where none is running); the defaults are this machine's standard ports.
TEST_DATABASE_NAME lets parallel runs keep apart."""
import os

os.environ.setdefault("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/test")
os.environ.setdefault("REDIS_URL", "redis://127.0.0.1:6379/15")
os.environ.setdefault("CELERY_TASK_ALWAYS_EAGER", "true")

from .base import *  # noqa: E402,F401,F403
from .base import DATABASES, env  # noqa: E402

PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
EMAIL_BACKEND = "django.core.mail.backends.locmem.EmailBackend"
DATABASES["default"]["CONN_MAX_AGE"] = 0
DATABASES["default"]["TEST"] = {"NAME": env("TEST_DATABASE_NAME", default="test_consensus_tokens")}
TIKTOKEN_CACHE_DIR = env("TIKTOKEN_CACHE_DIR", default=str(BASE_DIR / ".cache" / "tiktoken"))  # noqa: F405
