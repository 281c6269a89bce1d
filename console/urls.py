"""The console's pages for users: `/` and the dashboard (URL names `home`, `dashboard:*`)."""
from django.urls import include, path

from . import dashboard

dashboard_patterns = ([
    path("", dashboard.DashboardView.as_view(), name="home"),
    path("alerts", dashboard.AlertPreferencesView.as_view(), name="alert-preferences"),
    path("export.csv", dashboard.HistoryExportView.as_view(), name="export"),
], "dashboard")

urlpatterns = [
    path("", dashboard.home, name="home"),
    path("dashboard/", include(dashboard_patterns)),
]
