"""Only the metering API, mounted where the project mounts it: lets a test
generate its schema strictly (--fail-on-warn) whatever other apps serve."""
from django.urls import include, path

urlpatterns = [path("api/tokens/", include("metering.urls"))]
