"""The PostgreSQL consume statements (metering/services/consume/*.sql) name their INSERT columns by
hand. Held here to the models: a column renamed or a new NOT NULL column without a database default
would otherwise make every fast consume fail, be read as a concurrent replay and fall back to the slow
path without a word."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
from django.apps import apps
from django.db.models.fields import NOT_PROVIDED

from metering.services.consume import postgres

SQL_DIR = Path(postgres.__file__).parent
INSERT = re.compile(r"INSERT INTO (\w+)\s*\(([^)]*)\)", re.S)


def _inserts() -> list[tuple[str, str, list[str]]]:
    found = []
    for path in sorted(SQL_DIR.glob("*.sql")):
        text = "\n".join(line for line in path.read_text().splitlines() if not line.lstrip().startswith("--"))
        for table, columns in INSERT.findall(text):
            found.append((path.name, table, [c.strip() for c in columns.split(",")]))
    return found


def _model(table: str):
    return next(m for m in apps.get_models() if m._meta.db_table == table)


def test_the_fast_paths_insert_ledger_and_audit_rows():
    tables = {(where, table) for where, table, _ in _inserts()}
    assert tables == {("consume_single.sql", "metering_ledgerentry"), ("consume_single.sql", "metering_auditlog"),
                      ("consume_group.sql", "metering_ledgerentry"), ("consume_group.sql", "metering_auditlog"),
                      ("batch_write.sql", "metering_ledgerentry"), ("batch_audit.sql", "metering_auditlog")}


def test_the_statements_run_are_the_files_read():
    """postgres.py runs what these files say (comments aside), so the checks below hold what runs."""
    for where, table, columns in _inserts():
        statement = {"consume_single.sql": postgres.CONSUME_SINGLE, "consume_group.sql": postgres.CONSUME_GROUP,
                     "batch_write.sql": postgres.BATCH_WRITE, "batch_audit.sql": postgres.BATCH_AUDIT}[where]
        assert f"INSERT INTO {table} ({', '.join(columns)})" in re.sub(r"\s+", " ", statement), where


@pytest.mark.parametrize("where, table, columns", _inserts(), ids=lambda v: v if isinstance(v, str) else "")
def test_each_insert_names_real_columns_and_every_required_one(where, table, columns):
    fields = [f for f in _model(table)._meta.concrete_fields]
    known = {f.column for f in fields}
    assert not set(columns) - known, f"{where} inserts columns {table} does not have"
    assert len(columns) == len(set(columns)), f"{where} names a column twice"
    required = {f.column for f in fields if not f.null and not f.primary_key and f.db_default is NOT_PROVIDED}
    assert not required - set(columns), f"{where} leaves out NOT NULL columns of {table} with no database default"
