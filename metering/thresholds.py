"""The usage percentages another app acts on the moment a consume crosses them.

Alerts registers its thresholds; metering only asks. The single-statement consume
(services/consume/postgres.py) leaves a consume that crosses one, or enters overage, to
the ORM path, whose usage_recorded signal reaches the listener inside the transaction.
"""
from __future__ import annotations

from typing import Callable, Iterable

_threshold_sources: list[Callable[[], Iterable[int]]] = []


def register_usage_thresholds(source: Callable[[], Iterable[int]]) -> None:
    """source() returns percentages of the limit (e.g. 75, 90, 100); asked on every
    consume, so a changed setting applies at once."""
    if source not in _threshold_sources:
        _threshold_sources.append(source)


def usage_thresholds() -> list[int]:
    return sorted({int(pct) for source in _threshold_sources for pct in source()})
