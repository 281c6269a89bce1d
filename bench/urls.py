"""The project's urls plus one bare DRF view: the ceiling the real endpoints are
measured against (same middleware, same renderer, no auth, no database), and the
floor views of bench/floor.py (the least a consume or a batch can cost here)."""
from django.urls import path
from rest_framework.permissions import AllowAny
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from bench.floor import VARIANTS, FloorApi, FloorBatchApi
from consensus_tokens.urls import handler404, handler500, urlpatterns as project_urlpatterns  # noqa: F401


class BareApi(APIView):
    authentication_classes: list = []
    permission_classes = [AllowAny]

    def get(self, request: Request) -> Response:
        return Response({"ok": True})

    def post(self, request: Request) -> Response:
        return Response({"ok": True, "keys": sorted(request.data)}, status=201)


urlpatterns = [
    path("bench/bare", BareApi.as_view()),
    *(path(f"bench/floor/{variant}", FloorApi.as_view(variant=variant)) for variant in VARIANTS),
    path("bench/floor/batch-ledger", FloorBatchApi.as_view()),
    *project_urlpatterns,
]
