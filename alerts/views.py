"""The unsubscribe link. GET shows what the link turns off and a button (mail
scanners fetch links, so a GET changes nothing); POST turns it off, which is
also what RFC 8058 one-click unsubscribe in mail clients sends. The signed
token is the credential, so there is no login and no CSRF token."""
from django.shortcuts import render
from django.utils.decorators import method_decorator
from django.views import View
from django.views.decorators.csrf import csrf_exempt

from consensus_tokens.errors import ApplicationError

from .services import alert_unsubscribe
from .unsubscribe import dashboard_url, unsubscribe_token_read

LABELS = {
    "usage_alerts": "usage alerts (75%, 90% and 100% of your tokens)",
    "weekly_digest": "the weekly usage digest",
    "period_summary": "the end-of-period usage summary",
}


@method_decorator(csrf_exempt, name="dispatch")
class UnsubscribeView(View):
    template_name = "alerts/unsubscribe.html"

    def _page(self, request, *, status=200, **context):
        return render(request, self.template_name, {"dashboard_url": dashboard_url(), **context}, status=status)

    def get(self, request, token: str):
        try:
            _, preference = unsubscribe_token_read(token=token)
        except ApplicationError as error:
            return self._page(request, status=400, error=error.message)
        return self._page(request, kind=LABELS[preference], done=False)

    def post(self, request, token: str):
        try:
            _, preference = alert_unsubscribe(token=token)
        except ApplicationError as error:
            return self._page(request, status=400, error=error.message)
        return self._page(request, kind=LABELS[preference], done=True)
