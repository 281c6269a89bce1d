"""The recorded SQLite baseline (consensus_tokens/sqlite_baseline.py): a database loaded from it
and then migrated is the database `migrate` builds from nothing, and it records exactly the
migrations on disk. No test database is used: each database here is a SQLite file of its own."""
from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import django

from consensus_tokens.sqlite_baseline import (REGENERATE_COMMAND, disk_migrations, manifest_problems,
                                              manifest_read)

ROOT = Path(__file__).resolve().parents[2]


def manage(db_path: Path, *args: str) -> str:
    """A manage.py command on the SQLite file, with run.sh's embedded default settings."""
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "consensus_tokens.settings.local",
           "DATABASE_URL": f"sqlite:///{db_path}"}
    env.pop("REDIS_URL", None)
    done = subprocess.run([sys.executable, "manage.py", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def contents(db_path: Path) -> tuple[list[str], set[tuple[str, str]], list[str]]:
    """The schema (every table's and index's SQL), the migrations recorded, and every other row."""
    with sqlite3.connect(db_path) as db:
        schema = sorted(sql for (sql,) in db.execute(
            "SELECT sql FROM sqlite_master WHERE sql IS NOT NULL AND type IN ('table', 'index', 'trigger', 'view')"))
        migrations = set(db.execute("SELECT app, name FROM django_migrations"))
        rows = sorted(line for line in db.iterdump()
                      if line.startswith("INSERT INTO") and not line.startswith(('INSERT INTO "django_migrations"',
                                                                                 'INSERT INTO "sqlite_sequence"')))
    db.close()
    return schema, migrations, rows


def test_the_baseline_records_exactly_the_migrations_on_disk():
    manifest = manifest_read()
    recorded = {(app, name): digest for app, name, digest in manifest["migrations"]}
    on_disk = disk_migrations()
    fix = f"the SQLite baseline is out of date: regenerate it with `{REGENERATE_COMMAND}` and commit it"
    assert manifest["django"] == django.__version__, fix
    assert sorted(set(on_disk) - set(recorded)) == [], f"migrations not in the baseline; {fix}"
    assert sorted(set(recorded) - set(on_disk)) == [], f"the baseline records migrations not on disk; {fix}"
    changed = sorted(key for key in recorded if recorded[key] != on_disk[key])
    assert changed == [], f"migrations changed since the baseline was recorded; {fix}"
    assert manifest_problems(manifest=manifest, on_disk=on_disk) == []


def test_an_edited_or_missing_migration_keeps_the_baseline_out():
    manifest = manifest_read()
    on_disk = disk_migrations()
    (app, name, _), (other_app, other_name, _) = manifest["migrations"][:2]
    edited = {**on_disk, (app, name): "0" * 64}
    del edited[(other_app, other_name)]
    assert manifest_problems(manifest=manifest, on_disk=edited) == [
        f"{app}.{name} changed since the baseline was recorded", f"{other_app}.{other_name} is not on disk"]
    newer = {**on_disk, ("metering", "9999_newer"): "f" * 64}  # migrate applies it after the load
    assert manifest_problems(manifest=manifest, on_disk=newer) == []


def test_a_database_loaded_from_the_baseline_then_migrated_is_one_migrated_from_scratch(tmp_path):
    scratch, loaded = tmp_path / "scratch.sqlite3", tmp_path / "loaded.sqlite3"
    manage(scratch, "migrate", "--noinput", "-v", "0")  # the slow way, about 40 s

    assert manage(loaded, "sqlite_baseline_load").startswith("sqlite baseline: loaded ")
    migrate_output = manage(loaded, "migrate", "--noinput")
    assert "No migrations to apply." in migrate_output, migrate_output
    assert manage(loaded, "sqlite_baseline_load") == "sqlite baseline: not loaded: the database already has tables\n"

    scratch_schema, scratch_migrations, scratch_rows = contents(scratch)
    loaded_schema, loaded_migrations, loaded_rows = contents(loaded)
    assert loaded_schema == scratch_schema
    assert loaded_migrations == scratch_migrations == set(disk_migrations())
    assert loaded_rows == scratch_rows  # seeded tiers, operation types, providers, content types, permissions
    assert any(line.startswith('INSERT INTO "metering_provider"') for line in loaded_rows)
