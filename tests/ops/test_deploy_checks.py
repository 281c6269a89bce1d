"""Start-up and deploy checks on the production settings, run as the deployment runs
them (`manage.py check --deploy` in a process of its own), and production's logging:
error reports go to the JSON log only, never by e-mail, while staff reports still go."""
from __future__ import annotations

import json

import pytest

from .test_security import _production

pytestmark = [pytest.mark.within_one_period]


def test_check_deploy_fails_without_a_metrics_token_or_the_public_flag():
    refused = _production("manage.py", "check", "--deploy", drop=("METRICS_TOKEN",))
    assert refused.returncode != 0
    assert "consensus_tokens.E001" in refused.stderr and "METRICS_TOKEN" in refused.stderr
    public = _production("manage.py", "check", "--deploy", "--fail-level", "WARNING", drop=("METRICS_TOKEN",),
                         METRICS_PUBLIC="true")
    assert public.returncode == 0, public.stdout + public.stderr
    # plain `check` (every manage.py command) does not run deploy checks
    assert _production("manage.py", "check", drop=("METRICS_TOKEN",)).returncode == 0


@pytest.mark.parametrize("key", ["sk_test_abc def0123456789", "'sk_live_0123456789abcdef'", "pk_test_0123456789abcdef",
                                 "sk_0123456789abcdef", "sk_test_0123456789abcdef\n"])
def test_a_malformed_stripe_key_is_an_error_that_names_the_setting_never_the_value(key):
    result = _production("manage.py", "check", STRIPE_SECRET_KEY=key)
    assert result.returncode != 0
    assert "billing.E001" in result.stderr and "STRIPE_SECRET_KEY is malformed" in result.stderr
    assert key.strip().strip("'") not in result.stdout + result.stderr


def test_well_formed_stripe_keys_pass():
    for key in ("sk_live_51HxYzAbC0123456789", "rk_test_51HxYzAbC0123456789"):
        result = _production("manage.py", "check", STRIPE_SECRET_KEY=key)
        assert result.returncode == 0, result.stderr


PROBE = """
import django, logging, time
django.setup()
from django.core import mail
from django.core.mail import mail_admins
from django.utils.log import AdminEmailHandler
mail.outbox = []
handlers = [h for logger in [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]
            for h in getattr(logger, "handlers", [])]
assert not [h for h in handlers if isinstance(h, AdminEmailHandler)], handlers
logging.getLogger("django.request").error("Internal Server Error: /api/tokens/usage", extra={"status_code": 500})
logging.getLogger("django.security.DisallowedHost").error("Invalid HTTP_HOST header: 'evil.example'.")
logging.getLogger("billing.stripe_client").warning("stripe call failed: Invalid API Key provided: %s", "KEY")
assert mail.outbox == [], mail.outbox
mail_admins("Reconciliation: drift", "found drift")  # what reconcile and anomaly jobs send
assert [m.subject for m in mail.outbox] == ["[Django] Reconciliation: drift"], mail.outbox
"""


def test_production_logs_errors_as_json_mails_nobody_and_staff_reports_still_go():
    key = "sk_test_NotForTheLogs0123456789"
    result = _production("-c", PROBE.replace('"KEY"', repr(key)), EMAIL_URL="memorymail://",
                         STRIPE_SECRET_KEY=key)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    by_logger = {line["logger"]: line for line in lines}
    assert by_logger["django.request"]["level"] == "ERROR"
    assert by_logger["django.security.DisallowedHost"]["message"] == "Invalid HTTP_HOST header: 'evil.example'."
    assert by_logger["billing.stripe_client"]["message"] == "stripe call failed: Invalid API Key provided: [redacted]"
    assert key not in result.stderr and "NotForTheLogs" not in result.stderr


WORKER_PROBE = """
import django, logging
django.setup()
from consensus_tokens.celery import app
app.log.setup(loglevel="INFO")  # what `celery worker` and `beat` do as they start
logging.getLogger("celery.app.trace").error("Task billing.x raised: Invalid API Key provided: %s", "KEY")
"""


def test_celery_workers_log_json_through_the_same_redacting_handler():
    key = "sk_live_WorkerMustNotLogThis0123"
    result = _production("-c", WORKER_PROBE.replace('"KEY"', repr(key)), STRIPE_SECRET_KEY=key)
    assert result.returncode == 0, result.stderr
    [line] = [json.loads(line) for line in (result.stdout + result.stderr).splitlines() if line.startswith("{")]
    assert line["logger"] == "celery.app.trace" and line["message"].endswith("provided: [redacted]")
    assert key not in result.stdout + result.stderr
