"""The fast paths' raw INSERTs (fast_consume, fast_batch) name their columns by hand. Held here to
the models: a column renamed or a new NOT NULL column without a database default would otherwise
make every fast consume fail, be read as a concurrent replay and fall back to the slow path
without a word."""
from __future__ import annotations

import re

import pytest
from django.apps import apps
from django.db.models.fields import NOT_PROVIDED

from metering.services import fast_batch, fast_consume

INSERT = re.compile(r"INSERT INTO (\w+)\s*\(([^)]*)\)", re.S)


def _inserts() -> list[tuple[str, str, list[str]]]:
    found = []
    for module in (fast_consume, fast_batch):
        for name, value in vars(module).items():
            if isinstance(value, str):
                for table, columns in INSERT.findall(value):
                    found.append((f"{module.__name__}.{name}", table, [c.strip() for c in columns.split(",")]))
    return found


def _model(table: str):
    return next(m for m in apps.get_models() if m._meta.db_table == table)


def test_the_fast_paths_insert_ledger_and_audit_rows():
    tables = {(where.rsplit(".", 1)[0], table) for where, table, _ in _inserts()}
    assert tables == {("metering.services.fast_consume", "metering_ledgerentry"),
                      ("metering.services.fast_consume", "metering_auditlog"),
                      ("metering.services.fast_batch", "metering_ledgerentry"),
                      ("metering.services.fast_batch", "metering_auditlog")}


@pytest.mark.parametrize("where, table, columns", _inserts(), ids=lambda v: v if isinstance(v, str) else "")
def test_each_insert_names_real_columns_and_every_required_one(where, table, columns):
    fields = [f for f in _model(table)._meta.concrete_fields]
    known = {f.column for f in fields}
    assert not set(columns) - known, f"{where} inserts columns {table} does not have"
    assert len(columns) == len(set(columns)), f"{where} names a column twice"
    required = {f.column for f in fields if not f.null and not f.primary_key and f.db_default is NOT_PROVIDED}
    assert not required - set(columns), f"{where} leaves out NOT NULL columns of {table} with no database default"
