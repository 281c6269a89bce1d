from django.urls import path

from . import analytics_api, api

urlpatterns = [
    path("estimate", api.EstimateApi.as_view(), name="tokens-estimate"),
    path("check", api.CheckApi.as_view(), name="tokens-check"),
    path("consume", api.ConsumeApi.as_view(), name="tokens-consume"),
    path("consume/batch", api.BatchConsumeApi.as_view(), name="tokens-consume-batch"),
    path("release", api.ReleaseApi.as_view(), name="tokens-release"),
    path("usage", api.UsageApi.as_view(), name="tokens-usage"),
    path("history", api.HistoryApi.as_view(), name="tokens-history"),
    path("analytics/daily", analytics_api.DailyAnalyticsApi.as_view(), name="tokens-analytics-daily"),
    path("reports/monthly", analytics_api.MonthlyReportApi.as_view(), name="tokens-reports-monthly"),
]
