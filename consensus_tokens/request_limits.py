"""The request limits, answered in the API's error shape.

Django refuses a body past DATA_UPLOAD_MAX_MEMORY_SIZE with RequestDataTooBig, which
it turns into an HTML "Bad Request (400)" page, and gunicorn refuses a long request
line with an HTML 414 of its own. Here both become JSON: a body whose Content-Length
is past the limit answers 413 `payload_too_large` before anything reads it, and a URL
(path and query string) longer than MAX_URL_BYTES answers 414 `uri_too_long`.
gunicorn.conf.py lets request lines up to twice this through, so that the answer is
ours. (A body sent chunked, without a Content-Length, is caught where it is read:
errors.exception_handler maps RequestDataTooBig to the same 413.)
"""
from __future__ import annotations

from django.conf import settings
from django.http import HttpRequest, HttpResponse, JsonResponse

from consensus_tokens.errors import error_body, payload_too_large_body

MAX_URL_BYTES = 4096
# Where a URL past the limit answers 414: the JSON endpoints. Pages (the dashboard, admin)
# ignore query parameters they cannot use, so an odd link still opens them.
JSON_PATH_PREFIXES = ("/api/", "/health/", "/metrics")


class RequestLimitsMiddleware:
    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        if request.path.startswith(JSON_PATH_PREFIXES) and len(request.get_full_path()) > MAX_URL_BYTES:
            return JsonResponse(error_body("uri_too_long", f"The URL is longer than {MAX_URL_BYTES} bytes."),
                                status=414)
        limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
        # Django's limit leaves out the files of a multipart upload, so such a body is left to it
        multipart = request.content_type == "multipart/form-data"
        if limit is not None and not multipart and _content_length(request) > limit:
            return JsonResponse(payload_too_large_body(), status=413)
        return self.get_response(request)


def _content_length(request: HttpRequest) -> int:
    try:
        return int(request.META.get("CONTENT_LENGTH") or 0)
    except ValueError:  # Django reads a malformed length as none too
        return 0
