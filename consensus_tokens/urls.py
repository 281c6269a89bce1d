from django.contrib import admin
from django.http import JsonResponse
from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView

from consensus_tokens import health, metrics
from consensus_tokens.errors import error_body


def not_found(request, exception=None):
    if request.path.startswith("/api/"):
        return JsonResponse(error_body("not_found", "No such endpoint."), status=404)
    from django.views.defaults import page_not_found

    return page_not_found(request, exception)


def server_error(request):
    if request.path.startswith("/api/"):
        return JsonResponse(error_body("server_error", "Something went wrong on our side."), status=500)
    from django.views.defaults import server_error as default

    return default(request)


handler404 = not_found
handler500 = server_error

urlpatterns = [
    # The token API first: the busiest routes resolve without trying the others.
    path("api/tokens/", include("metering.urls")),
    path("admin/", admin.site.urls),
    path("", include("console.urls")),  # `/` and the dashboard
    path("accounts/", include("django.contrib.auth.urls")),
    path("alerts/", include("alerts.urls")),
    path("api/schema/", SpectacularAPIView.as_view(), name="schema"),
    path("health/live", health.live, name="health-live"),
    path("health/ready", health.ready, name="health-ready"),
    path("metrics", metrics.metrics_view, name="metrics"),
    path("stripe/", include("djstripe.urls", namespace="djstripe")),
    path("billing/", include("billing.urls")),
]
