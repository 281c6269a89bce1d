# syntax=docker/dockerfile:1
# One image for every process of the stack (see docker-compose.yml): web (gunicorn),
# worker and beat (celery), and the one-shot setup (migrate, periodic tasks).
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONPATH=/app \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DJANGO_SETTINGS_MODULE=consensus_tokens.settings.production

WORKDIR /app
RUN useradd --create-home --uid 10001 --user-group app

# Dependencies first, from pyproject.toml alone, so code changes reuse this layer.
# (pyproject installs no package of its own: the code runs from /app, on PYTHONPATH.)
COPY pyproject.toml ./
RUN pip install .

COPY . .
# Static files are collected into the image at build time. The production settings
# insist on their variables; these placeholders only let them load (collectstatic
# connects to nothing): the containers run with the real ones from docker-compose.yml.
RUN SECRET_KEY=build-only ALLOWED_HOSTS=build-only \
    DATABASE_URL=postgres://build-only@127.0.0.1:5432/build-only REDIS_URL=redis://127.0.0.1:6379/0 \
    STRIPE_SECRET_KEY=sk_test_build_only \
    python manage.py collectstatic --noinput -v 0

USER app
EXPOSE 8000
CMD ["gunicorn", "-c", "consensus_tokens/gunicorn.conf.py", "consensus_tokens.wsgi"]
