"""The checkout and portal endpoints the dashboard links to."""
from __future__ import annotations

import pytest
from django.core.management import call_command
from django.urls import reverse

from billing.models import BillingAccount


@pytest.fixture
def priced(stripe_on, settings):
    call_command("setup_stripe", stdout=open("/dev/null", "w"))
    return stripe_on


def test_urls_have_the_names_the_dashboard_uses():
    assert reverse("billing:checkout") == "/billing/checkout"
    assert reverse("billing:portal") == "/billing/portal"


@pytest.mark.django_db
@pytest.mark.parametrize("name", ["billing:checkout", "billing:portal"])
def test_without_stripe_configured_both_answer_503_clearly(client, make_user, name):
    client.force_login(make_user("basic"))
    response = client.post(reverse(name), {"tier": "pro", "interval": "month"}, HTTP_ACCEPT="application/json")
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "billing_unavailable"
    page = client.post(reverse(name), {"tier": "pro", "interval": "month"})
    assert page.status_code == 503 and b"Payments are not configured" in page.content
    assert not BillingAccount.objects.exclude(stripe_customer_id=None).exists()


@pytest.mark.django_db
def test_checkout_redirects_to_stripe_with_one_session_per_double_click(client, make_user, priced):
    fake = priced
    user = make_user("basic")
    client.force_login(user)
    first = client.post(reverse("billing:checkout"), {"tier": "pro", "interval": "year"})
    assert first.status_code == 303 and first["Location"].startswith(f"{fake.url}/pay/cs_test_")
    again = client.post(reverse("billing:checkout"), {"tier": "pro", "interval": "year"},
                        HTTP_ACCEPT="application/json")
    assert again.status_code == 200 and again.json() == {"url": first["Location"]}
    sessions = fake.all("checkout.session")
    assert len(sessions) == 1 and len(fake.all("customer")) == 1
    session = sessions[0]
    price = fake.get("price", fake.session_prices[session["id"]])
    assert price["lookup_key"] == "pro_yearly" and price["unit_amount"] == 49000
    assert session["customer"] == BillingAccount.objects.get(account__user=user).stripe_customer_id
    customer = fake.get("customer", session["customer"])
    assert customer["metadata"]["djstripe_subscriber"] == str(user.pk) and customer["email"] == user.email
    keys = [c.idempotency_key for c in fake.calls_to("POST", r"/v1/(customers|checkout/sessions)")]
    assert all(k and k.startswith("ct-") for k in keys)


@pytest.mark.django_db
def test_checkout_refuses_bad_input_with_the_error_shape(client, make_user, priced):
    client.force_login(make_user("basic"))
    url = reverse("billing:checkout")
    cases = [({"tier": "platinum", "interval": "month"}, 400, "unknown_tier"),
             ({"tier": "pro", "interval": "week"}, 400, "invalid_request"),
             ({"interval": "month"}, 400, "invalid_request"),
             ({"tier": "../../etc", "interval": "month"}, 400, "invalid_request")]
    for data, status, code in cases:
        response = client.post(url, data, HTTP_ACCEPT="application/json")
        assert response.status_code == status, (data, response.content)
        assert response.json()["error"]["code"] == code
    bad_json = client.post(url, "{not json", content_type="application/json", HTTP_ACCEPT="application/json")
    assert bad_json.status_code == 400 and bad_json.json()["error"]["code"] == "malformed_json"
    page = client.post(url, {"tier": "platinum", "interval": "month"})
    assert page.status_code == 400 and b"Unknown tier" in page.content


@pytest.mark.django_db
def test_checkout_and_portal_need_a_signed_in_user(client, priced):
    response = client.post(reverse("billing:checkout"), {"tier": "pro"}, HTTP_ACCEPT="application/json")
    assert response.status_code in (401, 403) and response.json()["error"]["code"] == "not_authenticated"
    page = client.post(reverse("billing:portal"))
    assert page.status_code == 303 and page["Location"].startswith("/accounts/login/")



@pytest.mark.django_db
def test_only_post_is_accepted(client, make_user, priced):
    client.force_login(make_user("basic"))
    response = client.get(reverse("billing:portal"), HTTP_ACCEPT="application/json")
    assert response.status_code == 405 and response.json()["error"]["code"] == "method_not_allowed"


@pytest.mark.django_db
def test_portal_opens_a_session_for_the_users_customer(client, make_user, priced):
    fake = priced
    user = make_user("pro")
    client.force_login(user)
    response = client.post(reverse("billing:portal"))
    assert response.status_code == 303 and response["Location"].startswith(f"{fake.url}/portal/bps_")
    (session,) = fake.all("billing_portal.session")
    assert session["customer"] == BillingAccount.objects.get(account__user=user).stripe_customer_id
    assert session["return_url"].endswith("/dashboard/")
    assert fake.calls_to("POST", r"/v1/billing_portal/sessions")[0].idempotency_key.startswith("ct-portal-")


@pytest.mark.django_db
def test_checkout_without_prices_set_up_says_so(client, make_user, stripe_on):
    client.force_login(make_user("basic"))
    response = client.post(reverse("billing:checkout"), {"tier": "pro", "interval": "month"},
                           HTTP_ACCEPT="application/json")
    assert response.status_code == 503 and response.json()["error"]["code"] == "price_not_set_up"


@pytest.mark.django_db
def test_checkout_refuses_a_second_subscription(client, make_user, priced):
    user = make_user("basic")
    client.force_login(user)
    client.post(reverse("billing:checkout"), {"tier": "pro", "interval": "month"})
    BillingAccount.objects.filter(account__user=user).update(stripe_subscription_id="sub_x",
                                                             subscription_status="active")
    response = client.post(reverse("billing:checkout"), {"tier": "enterprise", "interval": "month"},
                           HTTP_ACCEPT="application/json")
    assert response.status_code == 409 and response.json()["error"]["code"] == "already_subscribed"


@pytest.mark.django_db
@pytest.mark.parametrize("page", ["billing/overageinvoice", "billing/billingaccount", "billing/tierprice",
                                  "djstripe/webhookeventtrigger"])
def test_admin_pages_render(admin_client, page):
    assert admin_client.get(f"/admin/{page}/").status_code == 200
