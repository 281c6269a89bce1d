"""The client IP (consensus_tokens/client_ip.py): X-Forwarded-For only from trusted proxies,
read from the right; audit rows and the per-IP sign-in limit use it."""
from __future__ import annotations

import logging
import time

import pytest
import time_machine
from django.core.management import call_command
from django.core.management.base import SystemCheckError
from django.test import Client, RequestFactory

from consensus_tokens.client_ip import client_ip
from metering.models import AuditLog

pytestmark = pytest.mark.django_db

BALANCER = "10.0.0.5"  # the load balancer's node, as gunicorn sees it (REMOTE_ADDR)
ALICE, BOB, SPOOF = "203.0.113.7", "198.51.100.9", "192.0.2.66"
LOGIN = "/accounts/login/"
WRONG = {"username": "alice", "password": "wrong"}


@pytest.fixture
def behind_balancer(settings):
    settings.TRUSTED_PROXIES = ["10.0.0.0/24"]
    settings.TRUSTED_PROXY_COUNT = None  # default: one proxy with a list


@pytest.fixture
def login_limit(settings):
    """The production sign-in limit (10/m) on a stopped clock, so no window edge falls inside."""
    settings.RATELIMIT_IP_PATHS = {LOGIN: "10/m"}
    with time_machine.travel(time.time(), tick=False):
        yield


def audited_check(api, make_user, **headers) -> AuditLog:
    user = make_user("basic")
    answer = api.post("/api/tokens/check", {"userId": user.pk, "tokens": 10}, format="json",
                      HTTP_X_REQUEST_ID="client-ip-check", **headers)
    assert answer.status_code == 200, answer.content
    return AuditLog.objects.get(request_id="client-ip-check")


def failed_logins(client: Client, times: int, **headers) -> list[int]:
    return [client.post(LOGIN, WRONG, **headers).status_code for _ in range(times)]


def refusal_row() -> AuditLog:
    return AuditLog.objects.get(result="rate_limited", action="login")


# --- no trusted proxy (the default): REMOTE_ADDR only ---------------------------------------------

def test_without_trusted_proxies_a_spoofed_forwarded_for_is_ignored_by_audit_rows(api, make_user, settings):
    assert settings.TRUSTED_PROXIES == [] and settings.TRUSTED_PROXY_COUNT is None
    row = audited_check(api, make_user, REMOTE_ADDR=ALICE, HTTP_X_FORWARDED_FOR=SPOOF)
    assert row.client_ip == ALICE


def test_without_trusted_proxies_the_login_bucket_is_the_peer(login_limit):
    """Changing X-Forwarded-For on every try does not buy fresh attempts."""
    client = Client(REMOTE_ADDR=ALICE)
    answers = [client.post(LOGIN, WRONG, HTTP_X_FORWARDED_FOR=f"192.0.2.{n}").status_code for n in range(11)]
    assert answers == [200] * 10 + [429]
    assert refusal_row().client_ip == ALICE


# --- behind a trusted balancer ----------------------------------------------------------------------

def test_behind_the_trusted_balancer_audit_rows_record_the_forwarded_client(api, make_user, behind_balancer):
    # what the client wrote itself (SPOOF) sits left of what the balancer appended: never used
    row = audited_check(api, make_user, REMOTE_ADDR=BALANCER, HTTP_X_FORWARDED_FOR=f"{SPOOF}, {ALICE}")
    assert row.client_ip == ALICE


def test_behind_the_trusted_balancer_one_client_locked_out_does_not_lock_out_another(behind_balancer, login_limit):
    via_balancer = Client(REMOTE_ADDR=BALANCER)
    assert failed_logins(via_balancer, 10, HTTP_X_FORWARDED_FOR=ALICE) == [200] * 10
    refused = via_balancer.post(LOGIN, WRONG, HTTP_X_FORWARDED_FOR=ALICE)
    assert refused.status_code == 429 and refused["X-RateLimit-Remaining"] == "0"
    assert refusal_row().client_ip == ALICE
    # Bob, behind the same balancer, still has his ten attempts
    answer = via_balancer.post(LOGIN, WRONG, HTTP_X_FORWARDED_FOR=BOB)
    assert answer.status_code == 200 and answer["X-RateLimit-Remaining"] == "9"
    # and Alice cannot get hers back by writing someone else's address in front of her own
    assert via_balancer.post(LOGIN, WRONG, HTTP_X_FORWARDED_FOR=f"{SPOOF}, {ALICE}").status_code == 429


def test_a_forwarded_header_from_an_untrusted_peer_is_ignored(api, make_user, behind_balancer, login_limit):
    """Proxies configured, but this request did not come through one (it reached the app directly)."""
    row = audited_check(api, make_user, REMOTE_ADDR=BOB, HTTP_X_FORWARDED_FOR=ALICE)
    assert row.client_ip == BOB
    direct = Client(REMOTE_ADDR=BOB)
    answers = [direct.post(LOGIN, WRONG, HTTP_X_FORWARDED_FOR=f"192.0.2.{n}").status_code for n in range(11)]
    assert answers == [200] * 10 + [429]
    assert refusal_row().client_ip == BOB
    # Alice's bucket, behind the balancer, was never touched
    assert Client(REMOTE_ADDR=BALANCER).post(LOGIN, WRONG, HTTP_X_FORWARDED_FOR=ALICE)["X-RateLimit-Remaining"] == "9"


# --- the rule itself ----------------------------------------------------------------------------------

def ip(remote: str, forwarded: str | None = None) -> str:
    extra = {"REMOTE_ADDR": remote}
    if forwarded is not None:
        extra["HTTP_X_FORWARDED_FOR"] = forwarded
    return client_ip(RequestFactory().get("/", **extra))


def test_the_rule(settings):
    assert ip(ALICE, SPOOF) == ALICE  # nothing trusted
    settings.TRUSTED_PROXIES = ["10.0.0.0/24", "2001:db8:1::/48"]
    assert ip(BALANCER, f"{SPOOF}, {ALICE}") == ALICE
    assert ip("::ffff:10.0.0.5", ALICE) == ALICE  # an IPv4-mapped peer is the same balancer
    assert ip("2001:db8:1::7", "[2001:db8:9::1]:5050") == "2001:db8:9::1"
    assert ip(BALANCER) == BALANCER  # no header: the balancer's own request (a health check)
    assert ip(BALANCER, "unknown") == BALANCER  # nothing usable in it
    assert ip("10.0.1.5", ALICE) == "10.0.1.5"  # outside the list
    # two proxies (a CDN, then the balancer): the hop inside the header must be trusted too
    settings.TRUSTED_PROXIES = ["10.0.0.0/24", "172.16.0.0/12"]
    settings.TRUSTED_PROXY_COUNT = 2
    assert ip(BALANCER, f"{SPOOF}, {ALICE}, 172.16.4.4") == ALICE
    assert ip(BALANCER, f"{SPOOF}, {ALICE}") == ALICE  # came to the balancer directly: what it saw
    # a count without a list: every peer is a proxy, the count alone says where the client is
    settings.TRUSTED_PROXIES = []
    settings.TRUSTED_PROXY_COUNT = 1
    assert ip("127.0.0.1", f"{SPOOF}, {ALICE}") == ALICE


def test_a_bad_trusted_proxy_entry_stops_start_up(settings):
    settings.TRUSTED_PROXIES = ["10.0.0.0/24", "10.0.0."]
    with pytest.raises(SystemCheckError, match="consensus_tokens.E010"):
        call_command("check")


def test_the_request_log_names_the_forwarded_client(behind_balancer, caplog):
    with caplog.at_level(logging.INFO, logger="consensus_tokens.request"):
        Client(REMOTE_ADDR=BALANCER).get("/health/live", HTTP_X_FORWARDED_FOR=f"{SPOOF}, {ALICE}")
        Client(REMOTE_ADDR=BOB).get("/health/live", HTTP_X_FORWARDED_FOR=ALICE)
    assert [r.client_ip for r in caplog.records if r.name == "consensus_tokens.request"] == [ALICE, BOB]
