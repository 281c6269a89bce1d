"""OpenAPI generation (drf-spectacular): component names that stay unique when every view
nests its own InputSerializer/OutputSerializer (metering/auth.py describes its auth scheme)."""
from __future__ import annotations

from drf_spectacular.openapi import AutoSchema as SpectacularAutoSchema


class AutoSchema(SpectacularAutoSchema):
    def get_serializer_name(self, serializer, direction) -> str:
        """`CheckApi.InputSerializer` -> `CheckInput`: the view's name qualifies a nested
        serializer, so two views' `InputSerializer`s do not collapse into one component."""
        cls = serializer.__class__
        outer, _, inner = cls.__qualname__.rpartition(".")
        if not outer or "<locals>" in outer:
            return cls.__name__
        outer = outer.rsplit(".", 1)[-1]
        for suffix in ("Api", "View", "APIView"):
            if outer.endswith(suffix) and len(outer) > len(suffix):
                outer = outer[: -len(suffix)]
                break
        return outer + inner
