"""The unsubscribe link in the e-mails, and the preference services the dashboard calls."""
from __future__ import annotations

import pytest
from django.core import mail
from django.test import Client

from alerts.models import AlertEvent
from alerts.selectors import alert_preferences_get
from alerts.services import alert_preferences_update
from alerts.unsubscribe import unsubscribe_token_make
from consensus_tokens.errors import ApplicationError

from .conftest import html_of, link

pytestmark = pytest.mark.django_db
UNSUBSCRIBE = r"http://127\.0\.0\.1:8000(/alerts/unsubscribe/[^/\s\"]+/)"


def test_link_from_the_email_turns_usage_alerts_off_but_billing_notices_still_go(consume, make_user, on_commit):
    user = make_user("basic")
    on_commit(consume, user, 7_600)
    [first] = mail.outbox
    url = link(first.body, UNSUBSCRIBE).removeprefix("http://127.0.0.1:8000")
    assert url in html_of(first) and first.extra_headers["List-Unsubscribe"] == f"<http://127.0.0.1:8000{url}>"
    browser = Client(enforce_csrf_checks=True)  # not logged in: the signed link is enough

    page = browser.get(url)  # a mail scanner following the link changes nothing
    assert page.status_code == 200 and "Stop getting usage alerts" in page.content.decode()
    assert alert_preferences_get(user=user).usage_alerts is True
    done = browser.post(url)  # the button, or a mail client's one-click POST
    assert done.status_code == 200 and "you will no longer get usage alerts" in done.content.decode()
    assert alert_preferences_get(user=user).as_dict() == {"usage_alerts": False, "weekly_digest": True,
                                                          "period_summary": True}

    on_commit(consume, user, 2_000)  # 96%: the 90% alert is recorded, not sent
    assert AlertEvent.objects.get(account__user=user, threshold=90).status == "skipped"
    on_commit(consume, user, 1_000)  # into overage: the billing notice still goes
    assert [m.subject for m in mail.outbox][1:] == ["Overage: 600 tokens past your limit, $0.60 so far"]
    assert browser.post(url).status_code == 200  # following it again is harmless


def test_bad_or_tampered_links_answer_400_and_change_nothing(make_user):
    user = make_user("basic")
    token = unsubscribe_token_make(user_id=user.pk, preference="weekly_digest")
    browser = Client()
    for bad in ["nonsense", token[:-2] + "xx", token.replace(":", ":A", 1)]:
        assert browser.get(f"/alerts/unsubscribe/{bad}/").status_code == 400
        assert browser.post(f"/alerts/unsubscribe/{bad}/").status_code == 400
    assert alert_preferences_get(user=user).weekly_digest is True
    assert browser.post(f"/alerts/unsubscribe/{token}/").status_code == 200
    assert alert_preferences_get(user=user).as_dict() == {"usage_alerts": True, "weekly_digest": False,
                                                          "period_summary": True}


def test_preference_services_for_the_dashboard(make_user):
    user = make_user("basic")
    assert alert_preferences_get(user=user).as_dict() == {"usage_alerts": True, "weekly_digest": True,
                                                          "period_summary": True}
    assert alert_preferences_update(user=user, period_summary=False, weekly_digest=False).as_dict() == {
        "usage_alerts": True, "weekly_digest": False, "period_summary": False}
    assert alert_preferences_update(user=user, weekly_digest=True).weekly_digest is True
    with pytest.raises(ApplicationError) as error:
        alert_preferences_update(user=user, overage=False)  # billing-critical: no switch
    assert error.value.code == "invalid_request"
    with pytest.raises(ApplicationError):
        alert_preferences_update(user=user, usage_alerts="no")
