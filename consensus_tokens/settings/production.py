"""Production: secrets only from the environment, HTTPS everywhere, no debug pages,
JSON logs. `manage.py check --deploy` passes with no warnings (tests/ops checks it).

Required: SECRET_KEY, ALLOWED_HOSTS, DATABASE_URL, REDIS_URL (rate limits must be
shared by every web process), STRIPE_SECRET_KEY. Nothing secret has a default here.
"""
from django.core.exceptions import ImproperlyConfigured

from .base import *  # noqa: F401,F403
from .base import DATABASES, LOGGING, REDIS_URL, STRIPE_SECRET_KEY, env

DEBUG = False
DEBUG_PROPAGATE_EXCEPTIONS = False
SECRET_KEY = env("SECRET_KEY")
ALLOWED_HOSTS = env.list("ALLOWED_HOSTS")
CSRF_TRUSTED_ORIGINS = env.list("CSRF_TRUSTED_ORIGINS", default=[])

for _name, _value in (("DATABASE_URL", DATABASES["default"]["ENGINE"].endswith("postgresql")),
                      ("REDIS_URL", REDIS_URL), ("STRIPE_SECRET_KEY", STRIPE_SECRET_KEY)):
    if not _value:
        raise ImproperlyConfigured(f"Set {_name} in the environment (PostgreSQL for DATABASE_URL).")

# HTTPS: the load balancer terminates TLS and says so in X-Forwarded-Proto.
SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
SECURE_SSL_REDIRECT = env.bool("SECURE_SSL_REDIRECT", default=True)
# Health checks and Prometheus scrapes come over plain HTTP from inside the network.
SECURE_REDIRECT_EXEMPT = [r"^health/", r"^metrics$"]
# /metrics needs METRICS_TOKEN unless made public on purpose (METRICS_PUBLIC=true); with
# neither, it refuses and `check --deploy` fails (consensus_tokens/checks.py).
METRICS_PUBLIC = env.bool("METRICS_PUBLIC", default=False)
SECURE_HSTS_SECONDS = env.int("SECURE_HSTS_SECONDS", default=31536000)
SECURE_HSTS_INCLUDE_SUBDOMAINS = True
SECURE_HSTS_PRELOAD = True
SECURE_CONTENT_TYPE_NOSNIFF = True
SECURE_REFERRER_POLICY = "same-origin"
SECURE_CROSS_ORIGIN_OPENER_POLICY = "same-origin"
X_FRAME_OPTIONS = "DENY"

# Static files (collected into the image) are served by the app itself, right after
# the security middleware, so the stack needs no separate file server.
MIDDLEWARE = [*MIDDLEWARE]  # noqa: F405
MIDDLEWARE.insert(MIDDLEWARE.index("django.middleware.security.SecurityMiddleware") + 1,
                  "whitenoise.middleware.WhiteNoiseMiddleware")

SESSION_COOKIE_SECURE = True
SESSION_COOKIE_HTTPONLY = True
SESSION_COOKIE_SAMESITE = "Lax"
CSRF_COOKIE_SECURE = True

# One JSON object per line, each with the request id.
LOGGING = {**LOGGING, "handlers": {name: {**handler, "formatter": "json"}
                                   for name, handler in LOGGING["handlers"].items()}}
