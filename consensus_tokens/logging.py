"""Structured logs: a JSON formatter for production, the request id on every line,
one line per request, and no secret in any line.

RequestIdMiddleware (consensus_tokens/middleware.py) puts the request id in
`request_id_var`; `RequestIdFilter` copies it onto every log record made while
the request runs, so a query's warning and the request's own line share it.

`SecretRedactingFilter` rewrites every record before it is written: anything shaped
like a Stripe secret (`sk_…`, `rk_…`, `whsec_…`) and the configured secrets themselves
(a malformed key has no recognisable shape) become `[redacted]`, in the message, the
traceback and the `extra=` fields. Error reports go only to this log: no handler sends
e-mail, so no request ever waits on an SMTP server (settings LOGGING).
"""
from __future__ import annotations

import contextvars
import datetime as dt
import json
import logging
import re
import time
from typing import Any

from django.utils.functional import SimpleLazyObject, empty

from consensus_tokens.client_ip import client_ip

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")

# Attributes every LogRecord has; anything else on a record came from `extra=` and is logged too.
_RESERVED = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "request_id"}


class RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(record, "request_id", ""):
            record.request_id = request_id_var.get()
        return True


# Stripe's secret and restricted keys and webhook signing secrets; also the masked form
# Stripe echoes back ("Invalid API Key provided: sk_test_****1234").
_SECRET_SHAPES = re.compile(r"\b((?:sk|rk)_(?:test|live)_|whsec_)[A-Za-z0-9_*]+")
# Settings whose values are secrets, redacted wherever they appear, whatever their form.
SECRET_SETTINGS = ("STRIPE_SECRET_KEY", "STRIPE_WEBHOOK_SECRET", "SECRET_KEY", "METRICS_TOKEN")
_MIN_SECRET_LENGTH = 6  # a shorter value would redact ordinary words


def redact_secrets(text: str) -> str:
    """`text` with every secret replaced by `[redacted]` (the key's kind prefix is kept)."""
    from django.conf import settings

    if settings.configured:
        for name in SECRET_SETTINGS:
            value = str(getattr(settings, name, "") or "").strip()
            if len(value) >= _MIN_SECRET_LENGTH and value in text:
                text = text.replace(value, "[redacted]")
    return _SECRET_SHAPES.sub(r"\1[redacted]", text)


class SecretRedactingFilter(logging.Filter):
    """Never a secret in the logs: the message is formatted and redacted here (so a
    secret passed as an argument is caught too), and so are the traceback and extras."""

    _formatter = logging.Formatter()

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a bad format string: logging reports it when it emits
            return True
        redacted = redact_secrets(message)
        if redacted != message:
            record.msg, record.args = redacted, None
        if record.exc_info and not record.exc_text:
            record.exc_text = self._formatter.formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact_secrets(record.exc_text)
        for key, value in list(record.__dict__.items()):
            if key not in _RESERVED and isinstance(value, str) and not key.startswith("_"):
                record.__dict__[key] = redact_secrets(value)
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, message, request_id, any `extra=`
    fields, and the exception if there is one."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": dt.datetime.fromtimestamp(record.created, tz=dt.timezone.utc).isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = getattr(record, "request_id", "") or request_id_var.get()
        if request_id:
            entry["request_id"] = request_id
        for key, value in record.__dict__.items():
            if key not in _RESERVED and not key.startswith("_"):
                entry[key] = value
        if record.exc_info or record.exc_text:
            # exc_text, when set, is the traceback SecretRedactingFilter already redacted.
            entry["exc_info"] = record.exc_text or self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack_info"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


request_logger = logging.getLogger("consensus_tokens.request")


class RequestLogMiddleware:
    """One line per request: method, path, status, duration, who, and the request id."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        start = time.perf_counter()
        response = self.get_response(request)
        if request_logger.isEnabledFor(logging.INFO):
            status = response.status_code
            fields: dict[str, Any] = {
                "method": request.method, "path": request.path, "status": status,
                "duration_ms": round((time.perf_counter() - start) * 1000, 2),
                "client_ip": client_ip(request),
                "request_id": getattr(request, "request_id", ""),
            }
            principal = _principal(request)
            if principal:
                fields["principal"] = principal
            data = getattr(response, "data", None)
            if status >= 400 and isinstance(data, dict) and isinstance(data.get("error"), dict):
                fields["error_code"] = data["error"].get("code")
            level = logging.WARNING if status >= 500 else logging.INFO
            request_logger.log(level, "%s %s %s", request.method, request.path, status, extra=fields)
        return response


def _principal(request) -> str:
    """The caller, without costing a query: DRF puts its authenticated principal on the
    request; a session user still behind Django's lazy wrapper was never needed, so skip it."""
    user = request.__dict__.get("user")
    if isinstance(user, SimpleLazyObject):
        if user._wrapped is empty:
            return ""
        user = user._wrapped
    if user is None or not getattr(user, "is_authenticated", False):
        return ""
    return f"user:{user.pk}" if getattr(user, "pk", None) else str(user)
