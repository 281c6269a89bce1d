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
# Static files are collected into the image at build time; SECRET_KEY here only lets
# the production settings load, it is not the key the containers run with.
RUN SECRET_KEY=collectstatic-build-only python manage.py collectstatic --noinput -v 0

USER app
EXPOSE 8000
CMD ["gunicorn", "-c", "consensus_tokens/gunicorn.conf.py", "consensus_tokens.wsgi"]
