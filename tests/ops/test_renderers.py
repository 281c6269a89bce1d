"""consensus_tokens/renderers.py writes with orjson; what it writes must be the bytes
DRF's own JSONRenderer writes, which clients and stored replays were built on."""
from __future__ import annotations

import uuid
from collections import OrderedDict
from datetime import date, datetime, time, timedelta, timezone
from decimal import Decimal

import pytest
from django.utils.translation import gettext_lazy
from rest_framework.renderers import JSONRenderer
from rest_framework.utils.serializer_helpers import ReturnDict, ReturnList

from consensus_tokens.renderers import FastJSONRenderer

SAMPLES = {
    "usage": {"tier": "pro", "limit": 50_000, "used": 51_234, "usagePercentage": 102.46, "status": "exceeded",
              "overage": {"tokens": 1234, "charge": "1.234"}, "periodStart": "2026-11-01T00:00:00Z"},
    "unicode": {"op": "é ünïcode 漢字 🙂", "separators": "a\u2028b\u2029c", "control": "\x01\t\n\"\\"},
    "datetimes": {"at": datetime(2026, 11, 26, 1, 2, 3, 456789, tzinfo=timezone.utc), "day": date(2026, 11, 26),
                  "clock": time(1, 2, 3, 400000), "span": timedelta(minutes=15),
                  "offset": datetime(2026, 11, 26, 1, 2, 3, tzinfo=timezone(timedelta(hours=2)))},
    "decimals_and_ids": {"rate": Decimal("0.0008"), "charge": Decimal("12.345000"), "id": uuid.UUID(int=7),
                         "lazy": gettext_lazy("Consume")},
    "serializer_containers": ReturnDict(OrderedDict(a=1, b=ReturnList([1, 2.5, None, True], serializer=None)),
                                        serializer=None),
    "list": [1, -2, 3.25, "x", None, False, [], {}],
    "big_int": {"n": 2**70},  # past orjson's 64 bits: DRF's path
    "int_keys": {1: "one", 2: "two"},  # orjson refuses non-string keys: DRF's path
    "floats": {"p": 0.1, "q": 100.0, "r": 12.34, "s": 0.01, "t": 12345.678, "u": 99.99},
}


@pytest.mark.parametrize("name", SAMPLES)
def test_the_fast_renderer_writes_what_drf_writes(name):
    data = SAMPLES[name]
    assert FastJSONRenderer().render(data, "application/json") == JSONRenderer().render(data, "application/json")


def test_floats_json_writes_with_an_exponent_are_the_same_number():
    """The one difference left (renderers.py): json writes 3e-05 where orjson writes 0.00003."""
    import json

    data = {"tiny": 3e-05, "huge": 1.5e+300}
    fast, drf = FastJSONRenderer().render(data), JSONRenderer().render(data)
    assert fast != drf and json.loads(fast) == json.loads(drf) == data


def test_indentation_asked_for_is_drfs():
    data = {"a": [1, 2], "b": "c"}
    rendered = FastJSONRenderer().render(data, "application/json; indent=2")
    assert rendered == JSONRenderer().render(data, "application/json; indent=2") and b"\n  " in rendered


def test_nothing_renders_as_nothing():
    assert FastJSONRenderer().render(None) == b""


def test_the_api_answers_through_it(settings):
    assert settings.REST_FRAMEWORK["DEFAULT_RENDERER_CLASSES"] == ["consensus_tokens.renderers.FastJSONRenderer"]
