"""A fast path for validating plain, valid input against a DRF serializer.

DRF spends tens of microseconds per item building and running fields; a
1,000-item batch spent more time in validation than in the database. For a
serializer made only of the simple fields below, `plain_validator` returns a
function that checks an item with the fields' own settings (bounds, lengths,
blank, required, defaults) and returns exactly what the serializer would -
or None for anything it is not sure of (a missing required field, a wrong type,
surrounding whitespace, a UUID, any error), and the caller then runs the
serializer itself, which gives the usual answer and error messages. So this
can only make valid input faster; it never accepts or rejects differently.

A serializer with any other kind of field, validator or `validate*` method
gets a function that always returns None.
"""
from __future__ import annotations

from typing import Any, Callable

from django.core import validators as django_validators
from rest_framework import fields as drf_fields
from rest_framework import serializers
from rest_framework import validators as drf_validators

_KNOWN_VALIDATORS = (
    django_validators.MaxLengthValidator, django_validators.MinLengthValidator,
    django_validators.MaxValueValidator, django_validators.MinValueValidator,
    django_validators.ProhibitNullCharactersValidator, drf_validators.ProhibitSurrogateCharactersValidator,
)
_MISSING = object()
_ABSENT = object()

Check = Callable[[Any], Any]


def _never(data: Any) -> None:
    return None


def _integer_check(field: serializers.IntegerField) -> Check:
    low, high = field.min_value, field.max_value

    def check(value: Any) -> Any:
        if type(value) is not int or (low is not None and value < low) or (high is not None and value > high):
            return _MISSING
        return value
    return check


def _char_check(field: serializers.CharField) -> Check | None:
    if not field.trim_whitespace:
        return None
    low, high, allow_blank = field.min_length, field.max_length, field.allow_blank

    def check(value: Any) -> Any:
        if type(value) is not str or value != value.strip() or "\x00" in value:
            return _MISSING
        if not value:
            return value if allow_blank else _MISSING
        if (high is not None and len(value) > high) or (low is not None and len(value) < low):
            return _MISSING
        if not value.isascii() and any("\ud800" <= c <= "\udfff" for c in value):
            return _MISSING
        return value
    return check


def _choice_check(field: serializers.ChoiceField) -> Check:
    # DRF looks a choice up by str(value), so 1 may match "1": only exact strings here.
    choices = {key for key, value in field.choice_strings_to_values.items() if key == value}
    allow_blank = field.allow_blank

    def check(value: Any) -> Any:
        if type(value) is not str or not (value in choices or (allow_blank and value == "")):
            return _MISSING
        return value
    return check


def _field_check(field: drf_fields.Field, narrowing: tuple[type, ...]) -> Check | None:
    if any(not isinstance(v, _KNOWN_VALIDATORS) for v in field.validators):
        return None
    integer_parsers = {serializers.IntegerField.to_internal_value, *(c.to_internal_value for c in narrowing)}
    if isinstance(field, serializers.IntegerField) and type(field).to_internal_value in integer_parsers:
        return _integer_check(field)
    if type(field) is serializers.CharField or (isinstance(field, serializers.CharField) and type(field) in narrowing):
        return _char_check(field)
    if type(field) is serializers.ChoiceField:
        return _choice_check(field)
    if type(field) is serializers.UUIDField:  # only absent or null take the fast path
        return lambda value: _MISSING
    return None


def plain_validator(serializer_class: type[serializers.Serializer], *, narrowing: tuple[type, ...] = ()
                    ) -> Callable[[Any], dict[str, Any] | None]:
    """`narrowing`: IntegerField and CharField subclasses that only accept fewer inputs than
    their base (the checks here accept nothing but in-range ints, and strings that need no
    trimming within max_length, anyway)."""
    serializer = serializer_class()
    if type(serializer).validate is not serializers.Serializer.validate or any(
            hasattr(serializer, f"validate_{name}") for name in serializer.fields):
        return _never
    plan = []
    for name, field in serializer.fields.items():
        if field.read_only or field.source != name:
            return _never
        check = _field_check(field, narrowing)
        if check is None:
            return _never
        if field.required:
            default = _MISSING
        elif field.default is drf_fields.empty:
            default = _ABSENT  # DRF leaves the key out
        else:
            default = field.get_default()
            if callable(field.default):  # computed per call: not for this path
                return _never
        plan.append((name, check, field.required, field.allow_null, default))

    def validate(data: Any) -> dict[str, Any] | None:
        if type(data) is not dict:
            return None
        out = {}
        for name, check, required, allow_null, default in plan:
            value = data.get(name, _MISSING)
            if value is _MISSING:
                if required or default is _MISSING:
                    return None
                if default is not _ABSENT:
                    out[name] = default
                continue
            if value is None:
                if not allow_null:
                    return None
                out[name] = None
                continue
            value = check(value)
            if value is _MISSING:
                return None
            out[name] = value
        return out
    return validate
