"""The support actions' forms on an account's console page (console/admin.py)."""
from datetime import datetime, time, timedelta, timezone as dt_timezone

from django import forms

from alerts.selectors import alert_events_for_user
from metering.models import Account, Reservation, Tier
from metering.selectors import reservations_held


class ChangePlanForm(forms.Form):
    """A subscriber's tier changes by changing the Stripe subscription's price."""

    tier = forms.ModelChoiceField(queryset=Tier.objects.all(), empty_label=None,
                                  help_text="The subscription moves to this tier's price, at the same interval.")
    reason = forms.CharField(widget=forms.Textarea(attrs={"rows": 3, "cols": 60}),
                             help_text="Why? Kept in the audit log with your name.")


class CompForm(forms.Form):
    """A tier granted without billing, until the end of its last day (UTC)."""

    tier = forms.ModelChoiceField(queryset=Tier.objects.all(), empty_label=None)
    last_day = forms.DateField(label="Last day", widget=forms.DateInput(attrs={"type": "date"}),
                               help_text="YYYY-MM-DD. The comp ends at the end of this day (UTC); the account then "
                                         "returns to what its subscription pays for, or the default tier.")
    reason = forms.CharField(widget=forms.Textarea(attrs={"rows": 3, "cols": 60}),
                             help_text="Why is it granted without billing? Kept on the comp and in the audit log.")

    def clean(self):
        data = super().clean()
        if data.get("last_day"):
            data["ends_at"] = datetime.combine(data["last_day"] + timedelta(days=1), time.min, tzinfo=dt_timezone.utc)
        return data


class EndCompForm(forms.Form):
    reason = forms.CharField(widget=forms.Textarea(attrs={"rows": 3, "cols": 60}),
                             help_text="Why does the comp end before its date? Kept in the audit log.")


class TokensForm(forms.Form):
    KINDS = [("grant", "Grant bonus tokens (usage goes down)"),
             ("adjust", "Correct usage (+ adds used tokens, − gives them back)")]
    kind = forms.ChoiceField(choices=KINDS, widget=forms.RadioSelect, initial="grant")
    tokens = forms.IntegerField(min_value=-10_000_000, max_value=10_000_000,
                                help_text="Whole tokens. A grant must be positive.")
    reason = forms.CharField(widget=forms.Textarea(attrs={"rows": 3, "cols": 60}),
                             help_text="Why? It is written on the ledger entry and in the audit log.")


class ResetForm(forms.Form):
    reason = forms.CharField(widget=forms.Textarea(attrs={"rows": 3, "cols": 60}))
    confirm = forms.BooleanField(label="Yes, start this period's count again from zero (history stays)")


class ReleaseForm(forms.Form):
    reservation = forms.ModelChoiceField(queryset=Reservation.objects.none(), empty_label=None,
                                         label="Held reservation")
    reason = forms.CharField(widget=forms.Textarea(attrs={"rows": 3, "cols": 60}))

    def __init__(self, *args, account: Account, **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["reservation"].queryset = reservations_held(account=account)
        self.fields["reservation"].label_from_instance = (
            lambda r: f"{r.tokens:,} tokens · {r.operation_id or 'no operation id'} · "
                      f"held since {r.created_at:%Y-%m-%d %H:%M} UTC, expires {r.expires_at:%H:%M}")


class ResendAlertForm(forms.Form):
    alert = forms.ChoiceField(label="Alert", help_text="Pending or failed alerts of this account; a failed one "
                                                       "gets a fresh set of attempts.")
    reason = forms.CharField(widget=forms.Textarea(attrs={"rows": 3, "cols": 60}))

    def __init__(self, *args, account: Account, **kwargs):
        super().__init__(*args, **kwargs)
        events = [e for e in alert_events_for_user(user=account.user)[:200] if e.status in ("pending", "failed")]
        self.fields["alert"].choices = [
            (e.pk, f"{e} · {e.get_status_display()} · {e.created_at:%Y-%m-%d %H:%M} UTC · {e.recipient}")
            for e in events]


# The actions that change a tier: each shows what it will do (through Stripe, or a comp
# without billing) on a confirmation page, and only the confirm button acts.
CONFIRMED_ACTIONS = ("change-plan", "comp", "end-comp")

SUPPORT_ACTIONS = {
    "change-plan": ("Change plan through Stripe", ChangePlanForm),
    "comp": ("Comp a tier", CompForm),
    "end-comp": ("End comp", EndCompForm),
    "tokens": ("Grant or correct tokens", TokensForm),
    "reset": ("Reset the current period", ResetForm),
    "release": ("Release a stuck reservation", ReleaseForm),
    "resend-alert": ("Resend an alert", ResendAlertForm),
}
