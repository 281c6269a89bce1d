"""OpenAPI generation (drf-spectacular): component names that stay unique when every view
nests its own InputSerializer/OutputSerializer (metering/auth.py describes its auth scheme),
and request strings whose schema says what validation accepts."""
from __future__ import annotations

from django.core.validators import RegexValidator
from drf_spectacular.openapi import AutoSchema as SpectacularAutoSchema
from rest_framework import serializers

# What DRF's CharField accepts, as a pattern (schemathesis' positive data must be accepted):
# never a NUL (ProhibitNullCharactersValidator; PostgreSQL cannot store one), and unless blank is
# allowed at least one character that is not whitespace (the value is trimmed, then must not be empty).
# (where blank is allowed, drf-spectacular adds "" as a oneOf branch of its own: the pattern leaves it out)
TEXT_PATTERN = r"^[^\u0000]+$"
NON_BLANK_TEXT_PATTERN = r"^[^\u0000]*[^\s\u0000][^\u0000]*$"


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

    def _map_serializer_field(self, field, direction, bypass_extensions=False):
        schema = super()._map_serializer_field(field, direction, bypass_extensions)
        if (direction == "request" and isinstance(field, serializers.CharField) and isinstance(schema, dict)
                and schema.get("type") == "string" and not {"format", "enum", "pattern"} & set(schema)):
            regex = next((v.regex.pattern for v in field.validators if isinstance(v, RegexValidator)), None)
            trimmed_blank = field.trim_whitespace and not field.allow_blank
            schema["pattern"] = regex or (NON_BLANK_TEXT_PATTERN if trimmed_blank else TEXT_PATTERN)
            if not field.allow_blank:
                schema["minLength"] = max(schema.get("minLength", 1), 1)
        if (direction == "request" and getattr(field, "allow_empty", True) is False and isinstance(schema, dict)
                and schema.get("type") == "array"):
            schema["minItems"] = max(schema.get("minItems", 1), 1)  # DRF's allow_empty=False
        return schema
