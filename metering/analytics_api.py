"""Analytics and reports: read-only views over the daily rollups (selectors), so
they cost the same whatever the length of a user's history."""
from __future__ import annotations

from datetime import date, timedelta

from django.utils import timezone
from django.utils.dateparse import parse_date
from drf_spectacular.utils import extend_schema, extend_schema_field, inline_serializer
from rest_framework import serializers
from rest_framework.request import Request
from rest_framework.response import Response

from metering.auth import CanReadFor

from . import selectors
from .api import ERRORS, JsonApi, _valid, user_id_for

MAX_DAYS = 366 * 3  # one request covers at most three years of days
MONTH_PATTERN = r"^(000[1-9]|00[1-9]\d|0[1-9]\d\d|[1-9]\d\d\d)-(0[1-9]|1[0-2])$"


# 1970-01-01 to 9998-12-31 (the years 1970-9998), as StrictDateField checks
_DATE_RANGE_PATTERN = r"^(19[7-9]\d|[2-8]\d{3}|9[0-8]\d\d|99[0-8]\d|999[0-8])-\d\d-\d\d$"


@extend_schema_field({"type": "string", "format": "date", "pattern": _DATE_RANGE_PATTERN})
class StrictDateField(serializers.Field):
    default_error_messages = {"invalid": "Use a date as YYYY-MM-DD, from 1970-01-01 to 9998-12-31."}

    def to_internal_value(self, data):
        try:
            parsed = parse_date(data) if isinstance(data, str) and len(data) == 10 else None
        except ValueError:  # well-formed but impossible, such as 2026-13-01
            parsed = None
        if parsed is not None and not date(1970, 1, 1) <= parsed <= date(9998, 12, 31):
            parsed = None  # the day after 9999-12-31 does not exist; nothing was metered before 1970
        if parsed is None:
            self.fail("invalid")
        return parsed

    def to_representation(self, value):
        return value.isoformat()


class DailyAnalyticsApi(JsonApi):
    permission_classes = [CanReadFor]

    class FilterSerializer(serializers.Serializer):
        userId = serializers.IntegerField(required=False, min_value=1, max_value=2**63 - 1)
        to = StrictDateField(required=False)
        groupBy = serializers.ChoiceField(required=False, choices=["operationType"])

        def get_fields(self):
            fields = super().get_fields()
            fields["from"] = StrictDateField(required=False)  # a keyword in Python
            return fields

        def validate(self, attrs):
            until = attrs.get("to") or timezone.now().date()
            since = attrs.get("from") or until - timedelta(days=29)
            if since > until:
                raise serializers.ValidationError({"from": ["Must not be after 'to'."]})
            if (until - since).days + 1 > MAX_DAYS:
                raise serializers.ValidationError({"from": [f"At most {MAX_DAYS} days per request."]})
            attrs["since"], attrs["until"] = since, until
            return attrs

    class OutputSerializer(serializers.Serializer):
        date = serializers.DateField(source="day")
        operationType = serializers.CharField(source="operation_type", required=False)
        totalTokens = serializers.IntegerField(source="tokens")
        requestCount = serializers.IntegerField(source="requests")

    @extend_schema(parameters=[FilterSerializer],
                   responses={200: OutputSerializer(many=True), **ERRORS})
    def get(self, request: Request) -> Response:
        data = _valid(self.FilterSerializer, request, query=True)
        user_id = user_id_for(request, data.get("userId"))
        grouped = data.get("groupBy") == "operationType"
        points = selectors.usage_daily(user_id=user_id, since=data["since"], until=data["until"],
                                       by_operation_type=grouped)
        body = [{"date": p.day.isoformat(), **({"operationType": p.operation_type} if grouped else {}),
                 "totalTokens": p.tokens, "requestCount": p.requests} for p in points]
        return Response(body)


class MonthlyReportApi(JsonApi):
    permission_classes = [CanReadFor]

    class FilterSerializer(serializers.Serializer):
        userId = serializers.IntegerField(required=False, min_value=1, max_value=2**63 - 1)
        # Year 0000 does not exist in Python or PostgreSQL: months run from 0001-01 to 9999-12.
        month = serializers.RegexField(MONTH_PATTERN, required=False,
                                       error_messages={"invalid": "Use a month as YYYY-MM, from 0001-01 to 9999-12."})

    class OutputSerializer(serializers.Serializer):
        month = serializers.CharField()
        totalTokens = serializers.IntegerField()
        totalRequests = serializers.IntegerField()
        avgTokensPerRequest = serializers.FloatField()
        operations = inline_serializer("ReportOperation", {
            "operationType": serializers.CharField(), "tokens": serializers.IntegerField(),
            "requests": serializers.IntegerField()}, many=True)

    @extend_schema(parameters=[FilterSerializer],
                   responses={200: OutputSerializer, **ERRORS})
    def get(self, request: Request) -> Response:
        data = _valid(self.FilterSerializer, request, query=True)
        user_id = user_id_for(request, data.get("userId"))
        month = date.fromisoformat(data["month"] + "-01") if data.get("month") else timezone.now().date().replace(day=1)
        report = selectors.usage_monthly_report(user_id=user_id, month=month)
        return Response({
            # zero-padded whatever the year: strftime's %Y writes year 1 as "1"
            "month": f"{report.month.year:04d}-{report.month.month:02d}",
            "totalTokens": report.total_tokens,
            "totalRequests": report.total_requests,
            # a count ratio, not money: a JSON number rounded to cents of a token
            "avgTokensPerRequest": float(report.avg_tokens_per_request),
            "operations": [{"operationType": o.label, "tokens": o.tokens, "requests": o.requests}
                           for o in report.operations],
        })
