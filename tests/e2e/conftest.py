"""Browser tests: Playwright driving Debian's Chromium against pytest-django's
live server on real PostgreSQL. Screenshots go to artifacts/ (git-ignored)."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from django.db import connections

from tests.dashboard.conftest import consume  # noqa: F401  (a fixture, shared)

# Playwright's sync API keeps an event loop in this thread; the ORM calls the
# tests make between page actions are plain synchronous calls.
os.environ.setdefault("DJANGO_ALLOW_ASYNC_UNSAFE", "true")

CHROMIUM = os.environ.get("CHROMIUM_PATH", "/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"]


@pytest.fixture(scope="session")
def browser():
    if not shutil.which(CHROMIUM) and not Path(CHROMIUM).exists():
        pytest.fail(f"Chromium not found at {CHROMIUM}: run the test setup (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        yield browser
        browser.close()
        # Django's connections are context-local and Playwright's sync API runs the tests in a
        # context of its own: close the connections opened there before leaving it, or they
        # outlive the session and keep the test database from being dropped.
        connections.close_all()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 900}, locale="en-US", timezone_id="UTC")
    context.set_default_timeout(15_000)
    page = context.new_page()
    yield page
    context.close()


@pytest.fixture
def artifacts() -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS
