"""Settings shared by every environment, read from environment variables.

With nothing set the app runs on an embedded default: SQLite, a local-memory
cache and Celery running tasks eagerly, so a newcomer needs no servers.
"""
from pathlib import Path

import environ

BASE_DIR = Path(__file__).resolve().parent.parent.parent

env = environ.Env()
environ.Env.read_env(BASE_DIR / ".env", overwrite=False) if (BASE_DIR / ".env").exists() else None

SECRET_KEY = env("SECRET_KEY", default="dev-insecure-key-change-me-0123456789abcdefghijklmnop")
DEBUG = env.bool("DEBUG", default=False)
ALLOWED_HOSTS = env.list("ALLOWED_HOSTS", default=["127.0.0.1", "localhost", "testserver"])
SITE_URL = env("SITE_URL", default="http://127.0.0.1:8000").rstrip("/")
# Which deployment this is; service keys are bound to one environment.
DEPLOY_ENVIRONMENT = env("DEPLOY_ENVIRONMENT", default="development")

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "drf_spectacular",
    "django_celery_beat",
    "djstripe",
    "metering",
    "billing",
    "alerts",
    "console",
    "consensus_tokens.apps.OpsConfig",
]

MIDDLEWARE = [
    "consensus_tokens.middleware.RequestIdMiddleware",
    "consensus_tokens.logging.RequestLogMiddleware",
    "consensus_tokens.metrics.RequestMetricsMiddleware",
    "consensus_tokens.request_limits.RequestLimitsMiddleware",  # 413/414 in JSON, before anything reads the body
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "consensus_tokens.ratelimit.RateLimitMiddleware",
]

ROOT_URLCONF = "consensus_tokens.urls"
WSGI_APPLICATION = "consensus_tokens.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

DATABASES = {
    "default": env.db("DATABASE_URL", default=f"sqlite:///{BASE_DIR / 'db.sqlite3'}"),
}
DATABASES["default"]["ATOMIC_REQUESTS"] = False
if DATABASES["default"]["ENGINE"].endswith("postgresql"):
    DATABASES["default"].setdefault("CONN_MAX_AGE", env.int("DB_CONN_MAX_AGE", default=60))
    DATABASES["default"]["CONN_HEALTH_CHECKS"] = True
    # Server-side prepared statements only where the code asks for them (prepare=True: the
    # consume and batch statements, planned once per connection instead of on every request);
    # Django's own queries are never prepared, as by default. DB_PREPARED_STATEMENTS=false turns
    # them off, for a transaction-pooling pgbouncer that cannot keep them.
    DATABASES["default"].setdefault("OPTIONS", {})["prepare_threshold"] = (
        2**31 - 1 if env.bool("DB_PREPARED_STATEMENTS", default=True) else None)
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

REDIS_URL = env("REDIS_URL", default="")
if REDIS_URL:
    CACHES = {
        "default": {
            "BACKEND": "consensus_tokens.cache.RedisCache",
            "LOCATION": REDIS_URL,
            "TIMEOUT": 3600,
            # The cache is an optimisation: a Redis that hangs must not hang requests.
            "OPTIONS": {"socket_connect_timeout": 1, "socket_timeout": 1},
        },
        # Rate limit counters: short timeouts, so an unreachable Redis fails open quickly.
        "ratelimit": {
            "BACKEND": "consensus_tokens.cache.RedisCache",
            "LOCATION": env("RATELIMIT_REDIS_URL", default=REDIS_URL),
            "OPTIONS": {"socket_connect_timeout": 0.25, "socket_timeout": 0.25},
        },
    }
else:
    CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"},
              "ratelimit": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache", "LOCATION": "ratelimit"}}

# Rate limits (consensus_tokens/ratelimit.py): per user by tier and per service key on
# the token API; per client IP on POSTs to these paths (sign-in, password reset).
RATELIMIT_ENABLE = env.bool("RATELIMIT_ENABLE", default=True)
RATELIMIT_USE_CACHE = "ratelimit"
RATELIMIT_FAIL_OPEN = True
# A worker keeps users' tier limits until a tier or account change bumps the limits version
# (the next request sees it), and this long at most: a safety net, and the only bound without Redis.
RATELIMIT_TIER_CACHE_SECONDS = env.float("RATELIMIT_TIER_CACHE_SECONDS", default=600)
RATELIMIT_RETRY_SECONDS = env.float("RATELIMIT_RETRY_SECONDS", default=2)
RATELIMIT_WARNING_INTERVAL = env.float("RATELIMIT_WARNING_INTERVAL", default=10)
RATELIMIT_API_PREFIXES = ("/api/tokens/",)
RATELIMIT_IP_PATHS = {
    "/accounts/login/": env("RATELIMIT_LOGIN_RATE", default="10/m"),
    "/admin/login/": env("RATELIMIT_LOGIN_RATE", default="10/m"),
    "/accounts/password_reset/": env("RATELIMIT_PASSWORD_RESET_RATE", default="5/h"),
}
# The client IP (consensus_tokens/client_ip.py): X-Forwarded-For is read only from these proxies
# (IPs or CIDR networks, comma-separated), at most TRUSTED_PROXY_COUNT hops (the peer included;
# default 1 with a list, else 0). Neither set: REMOTE_ADDR only. Per-IP limits key on it too.
TRUSTED_PROXIES = env.list("TRUSTED_PROXIES", default=[])
_trusted_proxy_count = env("TRUSTED_PROXY_COUNT", default="")  # empty (docker-compose's unset): the default
TRUSTED_PROXY_COUNT = int(_trusted_proxy_count) if _trusted_proxy_count else None
RATELIMIT_IP_META_KEY = "consensus_tokens.client_ip.client_ip"
# Prometheus endpoint (/metrics): when set, scrapes must send `Authorization: Bearer <token>`.
METRICS_TOKEN = env("METRICS_TOKEN", default="")
# Without a token, metrics are served only if this is true: the default here (development,
# tests); production defaults to false, and `check --deploy` then asks for one or the other.
METRICS_PUBLIC = env.bool("METRICS_PUBLIC", default=True)

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
]
LOGIN_URL = "/accounts/login/"
LOGIN_REDIRECT_URL = "/dashboard/"
LOGOUT_REDIRECT_URL = "/accounts/login/"

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATICFILES_DIRS = [BASE_DIR / "static"]
STATIC_ROOT = env.path("STATIC_ROOT", default=BASE_DIR / "staticfiles")

# E-mail: EMAIL_URL such as smtp://127.0.0.1:1025; the console on the embedded default.
vars().update(env.email_url("EMAIL_URL", default="consolemail://"))
DEFAULT_FROM_EMAIL = env("DEFAULT_FROM_EMAIL", default="Consensus Tokens <noreply@consensus.local>")
SERVER_EMAIL = DEFAULT_FROM_EMAIL
ADMINS = [("Staff", a) for a in env.list("STAFF_EMAILS", default=["staff@consensus.local"])]
EMAIL_TIMEOUT = env.int("EMAIL_TIMEOUT", default=10)  # an SMTP server that hangs must not hang a worker

# Alerts and scheduled jobs (alerts/)
ALERT_THRESHOLDS = sorted(env.list("ALERT_THRESHOLDS", cast=int, default=[75, 90, 100]))  # % of the limit
ALERTS_MAX_ATTEMPTS = env.int("ALERTS_MAX_ATTEMPTS", default=8)
ALERTS_RESEND_EVERY_SECONDS = env.int("ALERTS_RESEND_EVERY_SECONDS", default=300)
# A recorded alert still unsent this long after it was recorded is sent by the periodic job.
ALERTS_RESEND_GRACE_SECONDS = env.int("ALERTS_RESEND_GRACE_SECONDS", default=120)
ALERTS_CLAIM_STALE_SECONDS = env.int("ALERTS_CLAIM_STALE_SECONDS", default=600)
ALERTS_SUMMARY_LOOKBACK_DAYS = env.int("ALERTS_SUMMARY_LOOKBACK_DAYS", default=7)
AUDIT_RETENTION_DAYS = env.int("AUDIT_RETENTION_DAYS", default=365)
WEBHOOK_RETENTION_DAYS = env.int("WEBHOOK_RETENTION_DAYS", default=90)
ANOMALY_MULTIPLIER = env.int("ANOMALY_MULTIPLIER", default=5)
ANOMALY_MIN_TOKENS = env.int("ANOMALY_MIN_TOKENS", default=5000)
ANOMALY_REFUSED_MIN = env.int("ANOMALY_REFUSED_MIN", default=30)
ANOMALY_HOLD = env.bool("ANOMALY_HOLD", default=False)

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "metering.auth.ServiceKeyAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_RENDERER_CLASSES": ["consensus_tokens.renderers.FastJSONRenderer"],  # DRF's JSON, written by orjson
    "DEFAULT_PARSER_CLASSES": ["rest_framework.parsers.JSONParser"],
    "EXCEPTION_HANDLER": "consensus_tokens.errors.exception_handler",
    # Limits only the paths in RATELIMIT_API_PREFIXES (metering/throttling.py).
    "DEFAULT_THROTTLE_CLASSES": ["metering.throttling.TokenRateThrottle"],
    "DEFAULT_SCHEMA_CLASS": "consensus_tokens.schema.AutoSchema",
    "UNAUTHENTICATED_USER": None,
}
SPECTACULAR_SETTINGS = {
    "TITLE": "Consensus Tokens API",
    "DESCRIPTION": "Estimate, check, reserve and consume tokens for AI operations.",
    "VERSION": "1.0.0",
    "SERVE_INCLUDE_SCHEMA": False,
}

# Metering
MAX_TOKENS_PER_REQUEST = env.int("MAX_TOKENS_PER_REQUEST", default=1_000_000)
# How long a web process keeps a service key row (metering/auth.py): a revoked
# key is refused by every process within this many seconds. 0 reads it on every request.
SERVICE_KEY_CACHE_SECONDS = env.float("SERVICE_KEY_CACHE_SECONDS", default=5)
RESERVATION_TTL_SECONDS = env.int("RESERVATION_TTL_SECONDS", default=15 * 60)
ESTIMATE_CACHE_SECONDS = env.int("ESTIMATE_CACHE_SECONDS", default=3600)
# How long a worker keeps an operation type's and provider's estimation rules (a staff
# change applies in that worker at once, in the others within this).
ESTIMATE_RULES_CACHE_SECONDS = env.float("ESTIMATE_RULES_CACHE_SECONDS", default=5)
# Ledger ids one calibration transaction reads (metering.calibration_learn).
CALIBRATION_BATCH_SIZE = env.int("CALIBRATION_BATCH_SIZE", default=5000)
# The one policy for accounts nobody pays for: the tier of a new account and of one whose
# canceled subscription's paid time is over (empty: none, no tokens). Such an account has no
# overage room unless its Stripe customer has a payment method on file.
DEFAULT_TIER = env("DEFAULT_TIER", default="basic") or None
# Where tiktoken keeps its encoding files; seeded from the installed bpe-openai package
# so estimation works offline, while a real deployment can still download.
TIKTOKEN_CACHE_DIR = env("TIKTOKEN_CACHE_DIR", default=str(Path.home() / ".cache" / "consensus-tokens" / "tiktoken"))
# Use the single-statement PostgreSQL path for direct consumes.
METERING_FAST_PATH = env.bool("METERING_FAST_PATH", default=True)
# Combine the direct consumes a process's threads make at once into one statement
# (metering/services/consume/combiner.py); matters under threaded workers only.
METERING_GROUP_COMMIT = env.bool("METERING_GROUP_COMMIT", default=True)
# Batches write one at a time on PostgreSQL (metering/services/consume/postgres.py says why);
# false lets batches for disjoint users write at once, contending on row locks only.
BATCH_WRITES_TAKE_TURNS = env.bool("BATCH_WRITES_TAKE_TURNS", default=True)
# Daily rollups of the ledger (metering.ledger_rollup_refresh): ids per batch; how long an id
# not yet visible is looked for again; how far before the last refresh the live slice reaches.
ROLLUP_BATCH_SIZE = env.int("ROLLUP_BATCH_SIZE", default=50_000)
ROLLUP_PENDING_SECONDS = env.int("ROLLUP_PENDING_SECONDS", default=3600)
ROLLUP_LIVE_SLACK_SECONDS = env.int("ROLLUP_LIVE_SLACK_SECONDS", default=300)

# Celery: Redis as broker when REDIS_URL is set, otherwise tasks run in-process.
CELERY_BROKER_URL = env("CELERY_BROKER_URL", default=REDIS_URL or "memory://")
CELERY_RESULT_BACKEND = None
CELERY_TASK_ALWAYS_EAGER = env.bool("CELERY_TASK_ALWAYS_EAGER", default=not REDIS_URL)
CELERY_TASK_EAGER_PROPAGATES = True
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TIMEZONE = "UTC"
CELERY_BEAT_SCHEDULER = "django_celery_beat.schedulers:DatabaseScheduler"
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True

# Stripe / dj-stripe
STRIPE_SECRET_KEY = env("STRIPE_SECRET_KEY", default="")
STRIPE_PUBLISHABLE_KEY = env("STRIPE_PUBLISHABLE_KEY", default="")
# The local loop with the Stripe CLI: the secret `stripe listen` prints (whsec_...). Set, our
# webhook endpoint is registered locally by `setup_stripe` and verifies with it (README).
STRIPE_WEBHOOK_SECRET = env("STRIPE_WEBHOOK_SECRET", default="")
STRIPE_LIVE_MODE = STRIPE_SECRET_KEY.startswith("sk_live_")
STRIPE_TEST_SECRET_KEY = STRIPE_SECRET_KEY if not STRIPE_LIVE_MODE else ""
STRIPE_LIVE_SECRET_KEY = STRIPE_SECRET_KEY if STRIPE_LIVE_MODE else ""
if env("STRIPE_API_HOST", default=""):
    STRIPE_API_HOST = env("STRIPE_API_HOST")
DJSTRIPE_FOREIGN_KEY_TO_FIELD = "id"
DJSTRIPE_WEBHOOK_VALIDATION = "verify_signature"
DJSTRIPE_USE_NATIVE_JSONFIELD = True

# Billing
# Days after a failed payment before the account is held to its included tokens.
BILLING_GRACE_PERIOD_DAYS = env.int("BILLING_GRACE_PERIOD_DAYS", default=3)

# Error reports (5xx, django.security.DisallowedHost, ...) go to this log only. Django's default
# config also mails them to ADMINS from inside the request (its `mail_admins` handler on the
# "django" logger): an SMTP server that hangs would hold every failing request, so the "django"
# logger is given no handler of its own here and its records reach the root's console handler.
# Staff reports sent by jobs (reconcile, anomalies) call mail_admins() directly and still go.
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "filters": {"request_id": {"()": "consensus_tokens.logging.RequestIdFilter"},
                "redact_secrets": {"()": "consensus_tokens.logging.SecretRedactingFilter"}},
    "formatters": {
        "plain": {"format": "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"},
        "json": {"()": "consensus_tokens.logging.JsonFormatter"},
    },
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": env("LOG_FORMAT", default="plain"),
                             "filters": ["request_id", "redact_secrets"]}},
    "loggers": {"django": {"handlers": [], "level": "INFO", "propagate": True}},
    "root": {"handlers": ["console"], "level": env("LOG_LEVEL", default="INFO")},
}
