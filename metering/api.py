"""The service API: thin views that validate, call one service, and answer."""
from __future__ import annotations

import json
from typing import Any

from django.conf import settings
from django.utils.dateparse import parse_date, parse_datetime
from drf_spectacular.utils import OpenApiParameter, extend_schema, inline_serializer
from rest_framework import serializers, status
from rest_framework.exceptions import ParseError, PermissionDenied
from rest_framework.pagination import CursorPagination
from rest_framework.parsers import JSONParser
from rest_framework.utils.json import strict_constant as json_strict_constant
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from consensus_tokens.errors import ApplicationError, validation_fields

from . import selectors, services
from .auth import CanConsume, CanReadFor
from .estimation import SCRIPT_CLASSES
from .principals import ServicePrincipal
from .services import ConsumeRequest, RequestContext
from .services.context import request_context
from .fast_validation import plain_validator
from .services.audit import known_user_id


class StrictJSONParser(JSONParser):
    """DRF's JSON parser, except that nesting too deep for Python's decoder and
    strings that are not Unicode text (lone surrogates such as "\\ud800", which
    the database cannot store) are malformed JSON - a 400, not a 500."""

    def parse(self, stream, media_type=None, parser_context=None):
        encoding = (parser_context or {}).get("encoding", settings.DEFAULT_CHARSET)
        raw = stream.read()
        try:
            data = json.loads(raw.decode(encoding), parse_constant=json_strict_constant if self.strict else None)
        except RecursionError:
            raise ParseError("JSON parse error - nested too deeply.") from None
        except ValueError as error:  # malformed JSON, or bytes that are not text in that encoding
            raise ParseError(f"JSON parse error - {error}") from None
        # In UTF-8 a lone surrogate cannot come from the bytes (they would not decode),
        # only from a \u escape: without one there is nothing to look for.
        maybe_escaped = b"\\u" in raw or encoding.lower().replace("-", "") != "utf8"
        if maybe_escaped and _holds_surrogates(data):
            raise ParseError("JSON parse error - a string holds a lone surrogate, which is not Unicode text.")
        return data


def _holds_surrogates(data: Any) -> bool:
    pending = [data]
    while pending:
        value = pending.pop()
        if isinstance(value, dict):
            pending.extend(value.keys())
            pending.extend(value.values())
        elif isinstance(value, list):
            pending.extend(value)
        elif isinstance(value, str) and not value.isascii():
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                return True
    return False


class JsonApi(APIView):
    parser_classes = [StrictJSONParser]


def user_id_for(request: Request, user_id: int | None) -> int:
    """Services name the user; a signed-in user may only ask about themselves."""
    principal = request.user
    if isinstance(principal, ServicePrincipal):
        if user_id is None:
            raise ApplicationError("userId is required.", code="invalid_request", extra={"fields": {"userId": ["This field is required."]}})
        return user_id
    if user_id is not None and user_id != principal.pk:
        raise PermissionDenied("You can only see your own usage.")
    return principal.pk


class StrictIntegerField(serializers.IntegerField):
    """Rejects booleans, floats with fractions and numeric strings, which DRF would coerce."""

    def to_internal_value(self, data):
        if isinstance(data, bool) or not isinstance(data, int):
            self.fail("invalid")
        return super().to_internal_value(data)


class StrictCharField(serializers.CharField):
    """Text only: refuses numbers and booleans (DRF would turn 0 into "0"), and a value longer
    than max_length before trimming, as the schema's maxLength does (DRF counts after)."""

    def run_validation(self, data=serializers.empty):
        if data is not serializers.empty and data is not None:
            if not isinstance(data, str):
                self.fail("invalid")
            if self.max_length is not None and len(data) > self.max_length:
                self.fail("max_length", max_length=self.max_length)
        return super().run_validation(data)


class StrictBooleanField(serializers.BooleanField):
    """true or false only: DRF would also take "yes", "on", 1, "true" and the like."""

    def to_internal_value(self, data):
        if not isinstance(data, bool):
            self.fail("invalid", input=data)
        return data


class StrictTokens(StrictIntegerField):
    def __init__(self, **kwargs):
        kwargs.setdefault("min_value", 1)
        kwargs.setdefault("max_value", settings.MAX_TOKENS_PER_REQUEST)
        super().__init__(**kwargs)


class UserIdField(StrictIntegerField):
    def __init__(self, **kwargs):
        kwargs.setdefault("min_value", 1)
        kwargs.setdefault("max_value", 2**63 - 1)
        super().__init__(**kwargs)


class UsageOutput(serializers.Serializer):
    tier = serializers.CharField(allow_null=True)
    limit = serializers.IntegerField()
    used = serializers.IntegerField()
    reserved = serializers.IntegerField()
    remaining = serializers.IntegerField()
    available = serializers.IntegerField()
    usagePercentage = serializers.FloatField()
    status = serializers.ChoiceField(choices=["low", "moderate", "warning", "critical", "exceeded"])
    cap = serializers.IntegerField()
    overage = inline_serializer("Overage", {"tokens": serializers.IntegerField(), "charge": serializers.CharField()})
    periodStart = serializers.DateTimeField()
    periodEnd = serializers.DateTimeField()


class ErrorOutput(serializers.Serializer):
    error = inline_serializer("ErrorBody", {
        "code": serializers.CharField(), "message": serializers.CharField(),
        "fields": serializers.DictField(required=False)})


# 429: a rate limit (consensus_tokens/ratelimit.py); 503: the database is unreachable (retry).
# 413/414: past the request limits (consensus_tokens/request_limits.py).
ERRORS = {400: ErrorOutput, 401: ErrorOutput, 403: ErrorOutput, 404: ErrorOutput, 413: ErrorOutput, 414: ErrorOutput,
          429: ErrorOutput, 503: ErrorOutput}


class EstimateApi(JsonApi):
    permission_classes = [CanReadFor]

    class InputSerializer(serializers.Serializer):
        userId = UserIdField(required=False)
        operationType = StrictCharField(max_length=40)
        provider = StrictCharField(max_length=40, default="openai")
        model = StrictCharField(max_length=100, required=False, allow_blank=True, default="")
        topic = StrictCharField(allow_blank=True, max_length=2_000_000, trim_whitespace=False)
        sources = serializers.ListField(child=StrictCharField(allow_blank=True, max_length=2_000_000,
                                                              trim_whitespace=False),
                                        required=False, default=list, max_length=1000)

    class OutputSerializer(serializers.Serializer):
        tokens = serializers.IntegerField()
        breakdown = inline_serializer("EstimateBreakdown", {"base": serializers.IntegerField(),
                                                            "content": serializers.IntegerField()})
        provider = serializers.CharField()
        encoding = serializers.CharField()
        method = serializers.ChoiceField(choices=["exact", "calibrated"])
        scriptClass = serializers.ChoiceField(choices=SCRIPT_CLASSES)
        calibrationSamples = serializers.IntegerField(
            help_text="Settled operations the calibration applied has learnt from (0: exact, or not learnt yet).")
        cached = serializers.BooleanField()

    @extend_schema(request=InputSerializer, responses={200: OutputSerializer, **ERRORS})
    def post(self, request: Request) -> Response:
        data = _valid(self.InputSerializer, request)
        user_id = user_id_for(request, data.get("userId"))
        services.account_for_user(user_id=user_id)
        result = services.tokens_estimate(operation_type=data["operationType"], provider=data["provider"],
                                          model=data["model"] or None, topic=data["topic"], sources=data["sources"])
        services.audit_record(ctx=request_context(request), user_id=user_id, action="estimate", result="estimated",
                              tokens=result["tokens"], operation_type=data["operationType"])
        return Response(result)


class CheckApi(JsonApi):
    permission_classes = [CanReadFor]

    class InputSerializer(serializers.Serializer):
        userId = UserIdField(required=False)
        tokens = StrictTokens()
        operationType = StrictCharField(max_length=40, required=False, allow_blank=True, default="")
        reserve = StrictBooleanField(required=False, default=False)
        operationId = StrictCharField(max_length=200, required=False, allow_blank=True, default="")
        ttlSeconds = StrictIntegerField(required=False, min_value=1, max_value=24 * 3600)

    class OutputSerializer(serializers.Serializer):
        sufficient = serializers.BooleanField()
        available = serializers.IntegerField()
        overage = serializers.IntegerField()
        cap = serializers.IntegerField()
        reservationId = serializers.UUIDField(required=False)
        expiresAt = serializers.DateTimeField(required=False)

    @extend_schema(request=InputSerializer, responses={200: OutputSerializer, **ERRORS})
    def post(self, request: Request) -> Response:
        data = _valid(self.InputSerializer, request)
        if data["reserve"] and not CanConsume().has_permission(request, self):
            raise PermissionDenied(CanConsume.message)
        user_id = user_id_for(request, data.get("userId"))
        ctx = request_context(request)
        try:
            result = services.usage_check(user_id=user_id, tokens=data["tokens"], ctx=ctx,
                                          operation_type=data["operationType"], reserve=data["reserve"],
                                          operation_id=data["operationId"], ttl_seconds=data.get("ttlSeconds"))
        except ApplicationError as error:
            if error.code != "unknown_user":
                services.audit_record(ctx=ctx, user_id=known_user_id(user_id), tokens=data["tokens"],
                                      action="reserve" if data["reserve"] else "check", result=error.code,
                                      operation_type=data["operationType"], operation_id=data["operationId"])
            raise
        body: dict[str, Any] = {"sufficient": result.sufficient, "available": result.available,
                                "overage": result.overage, "cap": result.cap}
        if result.reservation is not None:
            body["reservationId"] = str(result.reservation.pk)
            body["expiresAt"] = result.reservation.expires_at.isoformat().replace("+00:00", "Z")
        return Response(body)


class ConsumeInput(serializers.Serializer):
    userId = UserIdField()
    operationId = StrictCharField(max_length=200)
    tokens = StrictTokens()
    operationType = StrictCharField(max_length=40)
    provider = StrictCharField(max_length=40, required=False, allow_blank=True, default="")
    model = StrictCharField(max_length=100, required=False, allow_blank=True, default="")
    reservationId = serializers.UUIDField(
        required=False, allow_null=True, default=None,
        help_text="The hold (from /check with reserve) this consume settles: its tokens are freed and the actual "
                  "tokens recorded, beyond the hold only within the room left under the cap (else 402 "
                  "token_cap_exceeded, nothing recorded, the hold kept). In a batch, each hold once.")
    estimatedTokens = StrictIntegerField(required=False, allow_null=True, default=None, min_value=0,
                                         max_value=settings.MAX_TOKENS_PER_REQUEST)
    scriptClass = serializers.ChoiceField(
        choices=SCRIPT_CLASSES, required=False, allow_blank=True, default="",
        help_text="The scriptClass the estimate answered (with estimatedTokens, provider and model): estimates "
                  "learn per script from what operations really cost.")

    @staticmethod
    def to_request(data: dict[str, Any]) -> ConsumeRequest:
        return ConsumeRequest(user_id=data["userId"], operation_id=data["operationId"], tokens=data["tokens"],
                              operation_type=data["operationType"], provider=data["provider"], model=data["model"],
                              reservation_id=str(data["reservationId"]) if data["reservationId"] else "",
                              estimated_tokens=data["estimatedTokens"], script_class=data["scriptClass"])


# Valid, plain consume items skip DRF's per-field machinery (same result; anything
# else, errors included, still goes through ConsumeInput). See metering/fast_validation.py.
_consume_plain = plain_validator(ConsumeInput, narrowing=(StrictIntegerField, StrictCharField))


def _consume_batch_plain(data: Any) -> dict[str, Any] | None:
    operations = data.get("operations") if type(data) is dict else None
    if type(operations) is not list or not 1 <= len(operations) <= services.MAX_BATCH:
        return None
    items = [_consume_plain(item) for item in operations]
    return None if None in items else {"operations": items}


class ConsumeOutput(serializers.Serializer):
    operationId = serializers.CharField()
    entryId = serializers.IntegerField()
    tokens = serializers.IntegerField()
    recordedAt = serializers.DateTimeField()
    usage = UsageOutput()


class ConsumeApi(JsonApi):
    permission_classes = [CanConsume]

    @extend_schema(request=ConsumeInput, responses={200: ConsumeOutput, 201: ConsumeOutput, 402: ErrorOutput,
                                                    409: ErrorOutput, **ERRORS})
    def post(self, request: Request) -> Response:
        data = _consume_plain(request.data) or _valid(ConsumeInput, request)
        consume = ConsumeInput.to_request(data)
        ctx = request_context(request)
        try:
            result = services.usage_consume(request=consume, ctx=ctx)
        except ApplicationError as error:
            if error.code not in ("operation_id_conflict", "unknown_user"):
                services.consume_refused(request=consume, ctx=ctx, error=error)
            raise
        response = Response(result.body, status=status.HTTP_200_OK if result.replayed else status.HTTP_201_CREATED)
        if result.replayed:
            response["Idempotent-Replayed"] = "true"
        return response


class BatchConsumeApi(JsonApi):
    permission_classes = [CanConsume]

    class InputSerializer(serializers.Serializer):
        operations = ConsumeInput(many=True, allow_empty=False, max_length=services.MAX_BATCH)

    class OutputSerializer(serializers.Serializer):
        recorded = serializers.IntegerField()
        replayed = serializers.IntegerField()
        results = inline_serializer("BatchItem", {
            "index": serializers.IntegerField(), "result": serializers.ChoiceField(choices=["recorded", "replayed"]),
            "operationId": serializers.CharField(), "userId": serializers.IntegerField(),
            "entryId": serializers.IntegerField(), "usage": UsageOutput()}, many=True)

    @extend_schema(request=InputSerializer, responses={201: OutputSerializer, 402: ErrorOutput, 409: ErrorOutput,
                                                       **ERRORS})
    def post(self, request: Request) -> Response:
        try:
            data = _consume_batch_plain(request.data) or _valid(self.InputSerializer, request)
        except serializers.ValidationError as error:
            raise _naming_the_item(error) from None
        to_request = ConsumeInput.to_request
        requests = [to_request(item) for item in data["operations"]]
        ctx = request_context(request)
        try:
            results = services.usage_consume_batch(requests=requests, ctx=ctx)
        except ApplicationError as error:
            _audit_refused_batch(requests, ctx, error)
            raise
        items = [{"index": r.index, "result": "replayed" if r.replayed else "recorded",
                  "userId": requests[r.index].user_id, **r.body} for r in results]
        recorded = sum(1 for r in results if not r.replayed)
        return Response({"recorded": recorded, "replayed": len(results) - recorded, "results": items},
                        status=status.HTTP_201_CREATED if recorded else status.HTTP_200_OK)


def _audit_refused_batch(requests: list[ConsumeRequest], ctx: RequestContext, error: ApplicationError) -> None:
    index = error.extra.get("index")
    item = requests[index] if isinstance(index, int) else None
    services.audit_record(ctx=ctx, user_id=known_user_id(item.user_id) if item else None,
                          action="consume_batch", result=error.code, tokens=item.tokens if item else None,
                          operation_type=item.operation_type if item else "",
                          operation_id=item.operation_id if item else "",
                          detail={"index": index, "items": len(requests)})


def _naming_the_item(error: serializers.ValidationError) -> Exception:
    """An invalid batch item refuses the batch; the error says which item, as a refusal by the service does."""
    items = error.detail.get("operations") if isinstance(error.detail, dict) else None
    if isinstance(items, list) and all(isinstance(e, dict) for e in items):
        items = {i: e for i, e in enumerate(items) if e}
    if not isinstance(items, dict) or not items or not all(str(i).isdigit() for i in items):
        return error  # not about one item (not a list, empty, too long)
    index = min(int(i) for i in items)
    return ApplicationError(f"Item {index} is invalid.", code="invalid_request",
                            extra={"fields": validation_fields(error.detail), "index": index})


class ReleaseApi(JsonApi):
    permission_classes = [CanConsume]

    class InputSerializer(serializers.Serializer):
        userId = UserIdField()
        reservationId = serializers.UUIDField()

    class OutputSerializer(serializers.Serializer):
        reservationId = serializers.UUIDField()
        status = serializers.CharField()
        tokens = serializers.IntegerField()

    @extend_schema(request=InputSerializer, responses={200: OutputSerializer, 409: ErrorOutput, **ERRORS})
    def post(self, request: Request) -> Response:
        data = _valid(self.InputSerializer, request)
        ctx = request_context(request)
        try:
            reservation = services.reservation_release(user_id=data["userId"],
                                                       reservation_id=str(data["reservationId"]), ctx=ctx)
        except ApplicationError as error:
            if error.code != "unknown_user":
                services.audit_record(ctx=ctx, user_id=data["userId"], action="release", result=error.code,
                                      detail={"reservationId": str(data["reservationId"])})
            raise
        return Response({"reservationId": str(reservation.pk), "status": reservation.status,
                         "tokens": reservation.tokens})


class UsageApi(JsonApi):
    permission_classes = [CanReadFor]

    class FilterSerializer(serializers.Serializer):
        userId = serializers.IntegerField(required=False, min_value=1, max_value=2**63 - 1)

    @extend_schema(parameters=[FilterSerializer], responses={200: UsageOutput, **ERRORS})
    def get(self, request: Request) -> Response:
        data = _valid(self.FilterSerializer, request, query=True)
        user_id = user_id_for(request, data.get("userId"))
        return Response(services.usage_get(user_id=user_id).as_api())


# history's from/to: an ISO 8601 date (the whole day) or date-time
DATE_OR_DATE_TIME = {"type": "string", "anyOf": [{"format": "date"}, {"format": "date-time"}]}


class HistoryPagination(CursorPagination):
    ordering = ("-created_at", "-id")
    page_size = 50
    page_size_query_param = "pageSize"
    max_page_size = 500


class HistoryApi(JsonApi):
    permission_classes = [CanReadFor]

    class FilterSerializer(serializers.Serializer):
        userId = serializers.IntegerField(required=False, min_value=1, max_value=2**63 - 1)
        operationType = serializers.CharField(required=False, max_length=40)
        kind = serializers.ChoiceField(required=False, choices=["consumption", "reservation", "release", "grant",
                                                                "adjustment", "reset"])
        to = serializers.CharField(required=False)

        def validate(self, attrs):
            for field in ("from", "to"):
                raw = self.initial_data.get(field)
                if raw is None:
                    continue
                try:
                    # a date first: Python 3.11's fromisoformat (under parse_datetime) reads "2026-11-05"
                    # as midnight, and `to` would then leave out the very day it names
                    parsed = parse_date(raw) if len(raw) == 10 else parse_datetime(raw)
                except ValueError:  # well formed but not a real date, such as 2026-02-30
                    parsed = None
                if parsed is None:
                    raise serializers.ValidationError({field: ["Use an ISO 8601 date or date-time."]})
                attrs[field] = parsed
            return attrs

    class OutputSerializer(serializers.Serializer):
        id = serializers.IntegerField()
        kind = serializers.CharField()
        tokens = serializers.IntegerField(source="used_delta")
        reservedDelta = serializers.IntegerField(source="reserved_delta")
        operationId = serializers.CharField(source="operation_id")
        operationType = serializers.CharField(source="operation_type")
        provider = serializers.CharField()
        model = serializers.CharField()
        estimatedTokens = serializers.IntegerField(source="estimated_tokens", allow_null=True)
        actualTokens = serializers.IntegerField(source="actual_tokens", allow_null=True)
        reason = serializers.CharField()
        createdAt = serializers.DateTimeField(source="created_at")

    @extend_schema(parameters=[FilterSerializer, OpenApiParameter("from", DATE_OR_DATE_TIME),
                               OpenApiParameter("to", DATE_OR_DATE_TIME), OpenApiParameter("cursor", str),
                               OpenApiParameter("pageSize", int)],
                   responses={200: inline_serializer("HistoryPage", {
                       "next": serializers.CharField(allow_null=True), "previous": serializers.CharField(allow_null=True),
                       "results": OutputSerializer(many=True)}), **ERRORS})
    def get(self, request: Request) -> Response:
        data = _valid(self.FilterSerializer, request, query=True)
        user_id = user_id_for(request, data.get("userId"))
        services.account_for_user(user_id=user_id)
        entries = selectors.ledger_for_user(user_id=user_id, since=data.get("from"), until=data.get("to"),
                                            operation_type=data.get("operationType"), kind=data.get("kind"))
        paginator = HistoryPagination()
        page = paginator.paginate_queryset(entries, request, view=self)
        return paginator.get_paginated_response(self.OutputSerializer(page, many=True).data)


def _valid(serializer_class, request: Request, *, query: bool = False) -> dict[str, Any]:
    data = request.query_params if query else request.data
    if not query and not isinstance(data, dict):
        raise ApplicationError("The body must be a JSON object.", code="invalid_request")
    serializer = serializer_class(data=data)
    serializer.is_valid(raise_exception=True)
    return serializer.validated_data
