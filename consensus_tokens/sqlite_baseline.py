"""A recorded starting point for a new SQLite database, so the first `run.sh` does not spend
its first minute in `migrate`.

Why: on SQLite a full `migrate` takes 40-95 s of pure CPU, nearly all of it dj-stripe's
migrations re-rendering model state (hundreds of RemoveField operations); the SQL it runs takes
well under a second. `baseline_write` migrates a scratch database from nothing and records
everything the migrations leave behind (schema, seeded rows, content types and permissions,
django_migrations) as an SQL dump, with a manifest naming each migration and the sha256 of its
source. `baseline_load` replays that dump into an EMPTY SQLite database, and only when every
recorded migration is on disk with the same source and Django is the same version; `migrate`
then applies whatever is newer. Anything else (PostgreSQL, a database with tables, a migration
edited or removed) loads nothing and `migrate` does all the work, as before.

tests/ops/test_sqlite_baseline.py holds a loaded-then-migrated database to one migrated from
scratch, and the manifest to the migrations on disk: after adding a migration, regenerate with
REGENERATE_COMMAND.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import django
from django.conf import settings
from django.db import connections
from django.db.migrations.loader import MigrationLoader

BASELINE_SQL = Path(__file__).with_name("sqlite_baseline.sql.gz")
BASELINE_MANIFEST = Path(__file__).with_name("sqlite_baseline.json")
REGENERATE_COMMAND = ".venv/bin/python manage.py sqlite_baseline_write"

MigrationKey = tuple[str, str]  # (app label, migration name)


@dataclass(frozen=True)
class LoadResult:
    loaded: bool
    reason: str  # what was done, or why nothing was


def disk_migrations() -> dict[MigrationKey, str]:
    """Every migration Django finds on disk, with the sha256 of its source file (so a migration
    edited in place no longer matches the baseline, not only one added or removed)."""
    loader = MigrationLoader(None, ignore_no_migrations=True)
    found = {}
    for key, migration in loader.disk_migrations.items():
        source = Path(sys.modules[type(migration).__module__].__file__)
        found[key] = hashlib.sha256(source.read_bytes()).hexdigest()
    return found


def manifest_read(*, path: Path = BASELINE_MANIFEST) -> dict:
    return json.loads(path.read_text())


def manifest_problems(*, manifest: dict, on_disk: dict[MigrationKey, str]) -> list[str]:
    """Why the baseline may not be loaded with these migrations on disk (empty: it may).
    Migrations on disk that the baseline lacks are fine: `migrate` applies them after."""
    problems = []
    if manifest["django"] != django.__version__:
        problems.append(f"recorded with Django {manifest['django']}, this is {django.__version__}")
    for app_label, name, digest in manifest["migrations"]:
        if (app_label, name) not in on_disk:
            problems.append(f"{app_label}.{name} is not on disk")
        elif on_disk[(app_label, name)] != digest:
            problems.append(f"{app_label}.{name} changed since the baseline was recorded")
    return problems


def baseline_load(*, using: str = "default") -> LoadResult:
    """Load the baseline into the database `using` if it is SQLite, has no tables, and the
    baseline matches the migrations on disk. Idempotent: a second call finds tables and stops."""
    connection = connections[using]
    if connection.vendor != "sqlite":
        return LoadResult(False, f"the database is {connection.vendor}, not SQLite")
    if not BASELINE_SQL.exists():
        return LoadResult(False, f"no baseline at {BASELINE_SQL.name}")
    if connection.introspection.table_names():
        return LoadResult(False, "the database already has tables")
    manifest = manifest_read()
    problems = manifest_problems(manifest=manifest, on_disk=disk_migrations())
    if problems:
        return LoadResult(False, "the baseline is out of date (" + "; ".join(problems[:3])
                          + f"); regenerate it with {REGENERATE_COMMAND}")
    started = time.monotonic()
    connection.ensure_connection()
    raw = connection.connection
    # The dump is one BEGIN ... COMMIT, tables in name order: a row may come before the table its
    # foreign key names, which SQLite refuses while it enforces them (Django's schema editor
    # turns them off likewise). They are checked once everything is in.
    raw.execute("PRAGMA foreign_keys = OFF")
    try:
        raw.executescript(gzip.decompress(BASELINE_SQL.read_bytes()).decode())
        dangling = raw.execute("PRAGMA foreign_key_check").fetchall()
        if dangling:
            raise sqlite3.IntegrityError(f"the baseline has rows whose foreign keys point nowhere: {dangling[:5]}")
    except sqlite3.Error:
        if raw.in_transaction:
            raw.execute("ROLLBACK")
        for (table,) in raw.execute("SELECT name FROM sqlite_master WHERE type = 'table' "
                                    "AND name NOT LIKE 'sqlite_%'").fetchall():
            raw.execute(f'DROP TABLE "{table}"')  # leave it empty: `migrate` then builds it from scratch
        raise
    finally:
        raw.execute("PRAGMA foreign_keys = ON")
    return LoadResult(True, f"loaded {len(manifest['migrations'])} migrations' schema and rows "
                            f"in {time.monotonic() - started:.2f} s")


def baseline_write(*, sql_path: Path = BASELINE_SQL, manifest_path: Path = BASELINE_MANIFEST) -> dict:
    """Migrate a scratch SQLite database from nothing (in a child process: the settings name
    the configured database, not this one) and record it. Returns the manifest written."""
    with tempfile.TemporaryDirectory(prefix="ct-sqlite-baseline-") as tmp:
        db_path = Path(tmp) / "baseline.sqlite3"
        env = {**os.environ, "DJANGO_SETTINGS_MODULE": "consensus_tokens.settings.local",
               "DATABASE_URL": f"sqlite:///{db_path}"}
        env.pop("REDIS_URL", None)  # as run.sh's embedded default: nothing outside the process
        subprocess.run([sys.executable, "manage.py", "migrate", "--noinput", "-v", "0"], cwd=settings.BASE_DIR,
                       env=env, check=True)
        with sqlite3.connect(db_path) as scratch:
            applied = scratch.execute("SELECT app, name FROM django_migrations ORDER BY app, name").fetchall()
            dump = "\n".join(scratch.iterdump()) + "\n"
        scratch.close()
    on_disk = disk_migrations()
    missing = [f"{app}.{name}" for app, name in applied if (app, name) not in on_disk]
    if missing:
        raise RuntimeError(f"migrate recorded migrations that are not on disk: {', '.join(missing)}")
    manifest = {"django": django.__version__,
                "migrations": [[app, name, on_disk[(app, name)]] for app, name in applied]}
    sql_path.write_bytes(gzip.compress(dump.encode(), mtime=0))
    manifest_path.write_text(manifest_format(manifest))
    return manifest


def manifest_format(manifest: dict) -> str:
    """JSON with one migration a line, so a regenerated manifest reads well in a diff."""
    lines = ",\n".join("  " + json.dumps(entry) for entry in manifest["migrations"])
    return f'{{"django": {json.dumps(manifest["django"])},\n "migrations": [\n{lines}\n]}}\n'
