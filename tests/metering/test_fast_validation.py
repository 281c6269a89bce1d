"""metering/fast_validation.py: the consume path's validation without DRF answers exactly as
ConsumeInput does - the same data for what it takes, None (DRF decides) for anything else."""
from __future__ import annotations

import pytest

from metering.api import ConsumeInput, _consume_plain

BASE = {"userId": 7, "operationId": "op-1", "tokens": 5, "operationType": "summary"}

CASES = [
    {}, {"provider": "openai", "model": "gpt-4o"}, {"provider": "", "model": ""}, {"estimatedTokens": 4},
    {"reservationId": None}, {"estimatedTokens": None},
    {"operationId": 0}, {"operationId": 1.5}, {"operationId": True}, {"operationType": 0}, {"provider": 7},
    {"operationId": ""}, {"operationId": "   "}, {"operationId": " op "}, {"operationId": "x" * 200},
    {"operationId": "x" * 201}, {"operationId": " " + "x" * 200}, {"operationId": "a\u0000b"},
    {"operationType": "\t"}, {"model": "m" * 101}, {"tokens": 0}, {"tokens": "5"}, {"tokens": True},
    {"userId": 0}, {"userId": "7"}, {"estimatedTokens": -1},
    {"scriptClass": "cjk"}, {"scriptClass": ""}, {"scriptClass": "CJK"}, {"scriptClass": "latin "},
    {"scriptClass": 1}, {"scriptClass": None}, {"scriptClass": "klingon"},
]


@pytest.mark.parametrize("change", CASES, ids=[repr(c)[:40] for c in CASES])
def test_the_fast_path_agrees_with_the_serializer(change):
    item = {**BASE, **change}
    serializer = ConsumeInput(data=item)
    valid = serializer.is_valid()
    fast = _consume_plain(item)
    if fast is not None:
        assert valid and fast == dict(serializer.validated_data)
    assert valid or fast is None  # what DRF refuses never passes here


def test_a_plain_item_takes_the_fast_path_even_with_the_strict_fields():
    """ConsumeInput's StrictCharFields narrow CharField: they must not turn the fast path off."""
    assert _consume_plain(BASE) == {**BASE, "provider": "", "model": "", "reservationId": None,
                                    "estimatedTokens": None, "scriptClass": ""}
