"""The two endpoints the dashboard links to: start a Stripe Checkout, open the
Stripe billing portal. Both are POSTs from a signed-in user's form (CSRF-checked)
and answer 303 to Stripe; with `Accept: application/json` they answer `{url}`.
Errors answer the error shape in JSON, or a short page for a browser."""
from __future__ import annotations

from typing import Any

from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.shortcuts import render
from django.utils.http import urlencode
from rest_framework import exceptions as drf
from rest_framework import serializers
from rest_framework.authentication import SessionAuthentication
from rest_framework.parsers import FormParser, JSONParser, MultiPartParser
from rest_framework.permissions import IsAuthenticated
from rest_framework.response import Response
from rest_framework.views import APIView

from consensus_tokens.errors import exception_handler

from . import services


def _wants_json(request: HttpRequest) -> bool:
    return "application/json" in request.headers.get("Accept", "")


class _StripeRedirectView(APIView):
    # Browser form posts that redirect to Stripe, not part of the service API's OpenAPI schema.
    schema = None
    authentication_classes = [SessionAuthentication]
    permission_classes = [IsAuthenticated]
    parser_classes = [FormParser, MultiPartParser, JSONParser]

    def redirect(self, request: Any, url: str) -> HttpResponse:
        if _wants_json(request):
            return Response({"url": url})
        return HttpResponseRedirect(url, status=303)

    def handle_exception(self, exc: Exception) -> HttpResponse:
        if _wants_json(self.request):
            return super().handle_exception(exc)
        if isinstance(exc, (drf.NotAuthenticated, drf.AuthenticationFailed)):
            return HttpResponseRedirect(f"/accounts/login/?{urlencode({'next': '/dashboard/'})}", status=303)
        response = exception_handler(exc, self.get_exception_handler_context())
        if response is None:
            raise exc
        error = response.data["error"]
        return render(self.request, "billing/error.html", {"error": error}, status=response.status_code)

    def get_renderers(self) -> list[Any]:
        from rest_framework.renderers import JSONRenderer

        return [JSONRenderer()]


class CheckoutView(_StripeRedirectView):
    class InputSerializer(serializers.Serializer):
        tier = serializers.SlugField(max_length=40)
        interval = serializers.ChoiceField(choices=["month", "year"], default="month")

    def post(self, request: Any) -> HttpResponse:
        data = self.InputSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        url = services.checkout_session_create(user=request.user, tier_slug=data.validated_data["tier"],
                                               interval=data.validated_data["interval"])
        return self.redirect(request, url)


class PortalView(_StripeRedirectView):
    def post(self, request: Any) -> HttpResponse:
        return self.redirect(request, services.portal_session_create(user=request.user))
