"""The apps depend one way (pyproject.toml's import-linter contracts, run by scripts/test.sh before
the tests): the contracts hold on the tree, and an import against them is caught."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("consensus_tokens", "metering", "billing", "alerts", "console")
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def _lint(tree: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    return subprocess.run([str(LINT_IMPORTS), "--no-cache", "--config", str(tree / "pyproject.toml")], cwd=tree,
                          env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture
def tree_copy(tmp_path) -> Path:
    for name in PACKAGES:
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__", "*.sql.gz"))
    # the Python client, first on the copy's path (ahead of the installed one)
    shutil.copytree(ROOT / "clients" / "python" / "src" / "consensus_tokens_client", tmp_path / "consensus_tokens_client",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def test_the_tree_keeps_every_contract():
    done = _lint(ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 broken" in done.stdout


@pytest.mark.parametrize("module, bad_import, broken", [
    ("metering/selectors.py", "from billing.models import BillingAccount", "metering imports no other app"),
    ("metering/models.py", "import djstripe.models", "metering imports no other app"),
    ("alerts/selectors.py", "from billing import selectors", "billing and alerts are independent"),
    ("consensus_tokens/health.py", "from metering.models import Account", "The kernel (consensus_tokens) imports"),
    ("billing/models.py", "from console import selectors", "Only the console builds on the console"),
    ("metering/services/consume/orm.py", "from .postgres import consume_fast", "Consume: ORM and PostgreSQL paths"),
    ("metering/services/consume/postgres.py", "from .orm import consume_orm", "Consume: ORM and PostgreSQL paths"),
    ("metering/services/consume/contract.py", "from .dispatch import usage_consume", "Consume: ORM and PostgreSQL paths"),
    ("consensus_tokens_client/models.py", "from django.utils import timezone", "The Python client imports nothing"),
    ("consensus_tokens_client/client.py", "from metering.models import Account", "The Python client imports nothing"),
    ("metering/services/usage.py", "from consensus_tokens_client import Client", "The project does not import its client"),
])
def test_an_import_against_the_direction_is_caught(tree_copy, module, bad_import, broken):
    path = tree_copy / module
    path.write_text(path.read_text() + f"\n{bad_import}  # added by the test\n")
    done = _lint(tree_copy)
    assert done.returncode != 0
    assert f"{broken}" in done.stdout and "BROKEN" in done.stdout
