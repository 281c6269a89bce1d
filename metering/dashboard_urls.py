from django.urls import path

from . import dashboard

app_name = "dashboard"

urlpatterns = [
    path("", dashboard.DashboardView.as_view(), name="home"),
    path("alerts", dashboard.AlertPreferencesView.as_view(), name="alert-preferences"),
    path("export.csv", dashboard.HistoryExportView.as_view(), name="export"),
]
