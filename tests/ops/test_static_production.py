"""The image's static files: collected with the production settings (as the
Dockerfile does at build time) and served by the app itself under gunicorn."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import requests

from .conftest import ROOT, run_gunicorn
from .test_faults import HTTPS, production_env

pytestmark = [pytest.mark.django_db, pytest.mark.within_one_period]  # the gunicorn below connects to the test database


def test_production_collectstatic_and_serving(tmp_path):
    static_root = tmp_path / "staticfiles"
    env = production_env(STATIC_ROOT=str(static_root))
    # The Dockerfile's placeholders: collectstatic connects to nothing.
    build_env = {**os.environ, **env, "DATABASE_URL": "postgres://build-only@127.0.0.1:1/build-only",
                 "REDIS_URL": "redis://127.0.0.1:1/0"}
    subprocess.run([sys.executable, "manage.py", "collectstatic", "--noinput", "-v", "0"], cwd=ROOT, env=build_env,
                   check=True, timeout=120)
    collected = static_root / "dashboard" / "dashboard.css"
    assert collected.is_file() and (static_root / "admin" / "css" / "base.css").is_file()

    with run_gunicorn(workers=1, threads=2, env=env) as server:
        css = requests.get(server.url + "/static/dashboard/dashboard.css", headers=HTTPS, timeout=5)
        assert css.status_code == 200 and css.headers["Content-Type"].startswith("text/css")
        assert css.content == collected.read_bytes()
        missing = requests.get(server.url + "/static/dashboard/nope.css", headers=HTTPS, timeout=5)
        assert missing.status_code == 404
        # plain HTTP is sent to HTTPS, as everywhere but the health checks
        plain = requests.get(server.url + "/static/dashboard/dashboard.css", allow_redirects=False, timeout=5)
        assert plain.status_code == 301 and plain.headers["Location"].startswith("https://")
