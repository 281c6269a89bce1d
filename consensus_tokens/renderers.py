"""DRF's JSON renderer, writing with orjson when the answer is plain data.

A 1,000-item batch answers hundreds of kB of JSON, where DRF's json.dumps is slow
and orjson much faster (bench/README.md). What orjson would write differently goes to DRF's
encoder instead (orjson's `default` hook): datetimes (DRF cuts them to milliseconds
and writes UTC as Z), Decimals, lazy strings and other types json cannot write.
What orjson refuses (a non-string key, an integer past 64 bits) and every answer
that asks for indentation are rendered by DRF's own code, and U+2028/U+2029 are
escaped as DRF does. Two differences are left, in floats no endpoint answers: NaN
and infinities, which DRF refuses to render (strict JSON), orjson writes as null,
and a float json writes with an exponent (3e-05, 1e+16) orjson may write
without one or as 1e16 (the same number). tests/ops/test_renderers.py holds
the rest to DRF's bytes.
"""
from __future__ import annotations

from typing import Any

import orjson
from rest_framework.renderers import JSONRenderer

_OPTIONS = orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_PASSTHROUGH_DATACLASS


class FastJSONRenderer(JSONRenderer):
    def render(self, data: Any, accepted_media_type: str | None = None, renderer_context: Any = None) -> bytes:
        if (data is None or not self.compact or self.ensure_ascii
                or self.get_indent(accepted_media_type or "", renderer_context or {}) is not None):
            return super().render(data, accepted_media_type, renderer_context)
        try:
            rendered = orjson.dumps(data, default=self.encoder_class().default, option=_OPTIONS)
        except orjson.JSONEncodeError:
            return super().render(data, accepted_media_type, renderer_context)
        if b"\xe2\x80\xa8" in rendered or b"\xe2\x80\xa9" in rendered:  # as DRF: a strict JavaScript subset
            rendered = rendered.replace(b"\xe2\x80\xa8", b"\\u2028").replace(b"\xe2\x80\xa9", b"\\u2029")
        return rendered
