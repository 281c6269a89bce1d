"""A small fake Stripe at the HTTP edge, for tests.

A threaded HTTP server on 127.0.0.1 (random port) that speaks the part of the
Stripe API our code and dj-stripe call: the account, products, prices (with
lookup-key search and `transfer_lookup_key`), customers, subscriptions and their
items, invoices and their lines, invoice items, webhook endpoints, Checkout and
billing-portal sessions, and events. Every object is built from Stripe's own
example payloads (fixtures/openapi-fixtures3.json, current API format) and kept
in memory. Every request is recorded with its Idempotency-Key; a POST repeated
with a key already used answers what it answered the first time (a different
request under the same key is refused, as Stripe does).

The `FakeStripe` methods named after what happens on Stripe's side
(`checkout_complete`, `subscription_renew`, `invoice_pay`, ...) change the
objects and return the events Stripe would send; `deliver` posts an event to the
app's webhook endpoint signed like Stripe does (Stripe-Signature: t=…,v1=HMAC).
"""
from __future__ import annotations

import copy
import hashlib
import hmac
import itertools
import json
import re
import secrets
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable
from urllib.parse import parse_qsl, urlsplit

import urllib.error
import urllib.request

FIXTURES = Path(__file__).parent / "fixtures" / "openapi-fixtures3.json"
API_VERSION = "2026-05-27.dahlia"
MONTH = 30 * 24 * 3600


def period_end(start: int, interval: str) -> int:
    """A billing period's end: a 30-day month (as the tests count), or twelve calendar months
    (as Stripe counts a year: Feb 29 + 1 year = Feb 28)."""
    if interval != "year":
        return start + MONTH
    moment = datetime.fromtimestamp(start, tz=timezone.utc)
    try:
        return int(moment.replace(year=moment.year + 1).timestamp())
    except ValueError:  # Feb 29
        return int(moment.replace(year=moment.year + 1, day=28).timestamp())


@dataclass
class Call:
    method: str
    path: str
    params: dict[str, Any]
    idempotency_key: str | None
    status: int = 0
    replayed: bool = False


class StripeHTTPError(Exception):
    def __init__(self, status: int, message: str, *, code: str = "", type_: str = "invalid_request_error",
                 param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.type, self.param = status, message, code, type_, param

    def body(self) -> dict[str, Any]:
        error = {"type": self.type, "message": self.message}
        if self.code:
            error["code"] = self.code
        if self.param:
            error["param"] = self.param
        return {"error": error}


def decode_form(pairs: list[tuple[str, str]]) -> dict[str, Any]:
    """Stripe's form encoding (`a[b][0][c]=v`) into nested dicts and lists."""
    root: dict[str, Any] = {}
    for key, value in pairs:
        match = re.match(r"^([^\[]+)((?:\[[^\]]*\])*)$", key)
        if not match:
            continue
        parts = [match.group(1)] + re.findall(r"\[([^\]]*)\]", match.group(2))
        node: Any = root
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            if last:
                node[part] = value
            else:
                node = node.setdefault(part, {})

    def lists(node: Any) -> Any:
        if isinstance(node, dict):
            if node and all(k.isdigit() for k in node):
                return [lists(node[k]) for k in sorted(node, key=int)]
            return {k: lists(v) for k, v in node.items()}
        return node

    return lists(root)


def _bool(value: Any) -> bool:
    return str(value).lower() == "true"


class FakeStripe:
    def __init__(self, *, secret_key: str = "sk_test_FakeConsensusTokens0123456789") -> None:
        self.secret_key = secret_key
        self.templates: dict[str, dict[str, Any]] = json.loads(FIXTURES.read_text())["resources"]
        self.lock = threading.RLock()
        self.objects: dict[str, dict[str, dict[str, Any]]] = {}
        self.calls: list[Call] = []
        self.idempotent: dict[str, tuple[str, int, dict[str, Any]]] = {}
        self.webhook_secrets: dict[str, str] = {}
        self.session_prices: dict[str, str] = {}
        # Callables run after a request's answer is decided and before it is sent:
        # hook(call, status, body). Tests use them to break things at exact moments.
        self.before_answer: list[Callable[[Call, int, dict[str, Any]], None]] = []
        self.fail_next: list[tuple[str, str, int]] = []  # (method, path regex, status)
        # Events Stripe sends because of an API call (a subscription update), for tests to deliver.
        self.outbox: list[dict[str, Any]] = []
        # Each price change a subscription update applied (subscription, item, from_price, price,
        # proration_behavior, proration); the request itself, key included, is in `calls`.
        self.subscription_updates: list[dict[str, Any]] = []
        self._ids = itertools.count(1)
        self.account = self._from_template("account", id="acct_1FakeConsensus0001", email="billing@example.com")
        self._server: ThreadingHTTPServer | None = None
        self.url = ""

    # --- server ---------------------------------------------------------------------------------

    def start(self) -> FakeStripe:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length).decode() if length else ""
                parts = urlsplit(self.path)
                pairs = parse_qsl(parts.query, keep_blank_values=True) + parse_qsl(body, keep_blank_values=True)
                status, payload = fake.handle(self.command, parts.path, decode_form(pairs),
                                              idempotency_key=self.headers.get("Idempotency-Key"),
                                              authorization=self.headers.get("Authorization", ""))
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.send_header("Request-Id", f"req_{secrets.token_hex(8)}")
                # No keep-alive: a client's pooled connection (the stripe library keeps one
                # per thread) must not outlive this fake and reach it after stop(), when a
                # later test's fake may have the same port.
                self.send_header("Connection", "close")
                self.close_connection = True
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_DELETE = _handle

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    # --- request handling -------------------------------------------------------------------------

    def handle(self, method: str, path: str, params: dict[str, Any], *, idempotency_key: str | None,
               authorization: str) -> tuple[int, dict[str, Any]]:
        call = Call(method, path, params, idempotency_key)
        with self.lock:
            self.calls.append(call)
            fingerprint = json.dumps([method, path, params], sort_keys=True)
            if method == "POST" and idempotency_key and idempotency_key in self.idempotent:
                seen, status, body = self.idempotent[idempotency_key]
                if seen != fingerprint:
                    status, body = 400, StripeHTTPError(
                        400, f"Keys for idempotent requests can only be used with the same parameters they were "
                             f"first used with. Try using a key other than '{idempotency_key}'.",
                        type_="idempotency_error").body()
                call.replayed = True
            else:
                status, body = self._answer(method, path, params, authorization)
                if method == "POST" and idempotency_key and status < 500:
                    self.idempotent[idempotency_key] = (fingerprint, status, copy.deepcopy(body))
            call.status = status
        for hook in list(self.before_answer):
            hook(call, status, body)
        return status, body

    def _answer(self, method: str, path: str, params: dict[str, Any], authorization: str
                ) -> tuple[int, dict[str, Any]]:
        if authorization != f"Bearer {self.secret_key}":
            # Stripe quotes the key it was given, all but its kind and last four characters masked.
            given = authorization.removeprefix("Bearer ")
            kind, _, rest = given.rpartition("_")
            masked = f"{kind}_{'*' * max(len(rest) - 4, 0)}{rest[-4:]}" if kind else given
            return 401, StripeHTTPError(401, f"Invalid API Key provided: {masked}",
                                        type_="invalid_request_error").body()
        for i, (m, pattern, status) in enumerate(self.fail_next):
            if m == method and re.fullmatch(pattern, path):
                del self.fail_next[i]
                return status, StripeHTTPError(status, "Simulated Stripe outage.", type_="api_error").body()
        for route_method, pattern, func in self.routes():
            match = re.fullmatch(pattern, path)
            if route_method == method and match:
                try:
                    return 200, func(params, *match.groups())
                except StripeHTTPError as exc:
                    return exc.status, exc.body()
        return 404, StripeHTTPError(404, f"Unrecognized request URL ({method}: {path}).").body()

    def routes(self) -> list[tuple[str, str, Callable[..., dict[str, Any]]]]:
        return [
            ("GET", r"/v1/account", lambda p: self.account),
            ("GET", r"/v1/accounts/([^/]+)", lambda p, i: self._account(i)),
            ("POST", r"/v1/products", self._product_create),
            ("GET", r"/v1/products", lambda p: self._list("product", p)),
            ("GET", r"/v1/products/([^/]+)", lambda p, i: self.get("product", i)),
            ("POST", r"/v1/products/([^/]+)", self._product_update),
            ("GET", r"/v1/products/([^/]+)/features", lambda p, i: self._list("product_feature", {}, [])),
            ("POST", r"/v1/prices", self._price_create),
            ("GET", r"/v1/prices", self._price_list),
            ("GET", r"/v1/prices/([^/]+)", lambda p, i: self.get("price", i)),
            ("POST", r"/v1/prices/([^/]+)", self._price_update),
            ("POST", r"/v1/customers", self._customer_create),
            ("GET", r"/v1/customers/([^/]+)", lambda p, i: self.get("customer", i)),
            ("GET", r"/v1/subscriptions", lambda p: self._list("subscription", p)),
            ("GET", r"/v1/subscriptions/([^/]+)", lambda p, i: self.get("subscription", i)),
            ("POST", r"/v1/subscriptions/([^/]+)", self._subscription_update),
            ("GET", r"/v1/subscription_items/([^/]+)", lambda p, i: self.get("subscription_item", i)),
            ("POST", r"/v1/invoices", self._invoice_create_now),
            ("POST", r"/v1/invoices/([^/]+)/finalize", self._invoice_finalize),
            ("POST", r"/v1/customers/([^/]+)", self._customer_update),
            ("GET", r"/v1/invoices", lambda p: self._list("invoice", p)),
            ("GET", r"/v1/invoices/([^/]+)", lambda p, i: self.get("invoice", i)),
            ("GET", r"/v1/invoices/([^/]+)/lines", lambda p, i: self.get("invoice", i)["lines"]),
            ("POST", r"/v1/invoiceitems", self._invoiceitem_create),
            ("GET", r"/v1/invoiceitems", lambda p: self._list("invoiceitem", p)),
            ("GET", r"/v1/invoiceitems/([^/]+)", lambda p, i: self.get("invoiceitem", i)),
            ("POST", r"/v1/webhook_endpoints", self._webhook_endpoint_create),
            ("GET", r"/v1/webhook_endpoints", lambda p: self._list("webhook_endpoint", p)),
            ("GET", r"/v1/webhook_endpoints/([^/]+)", lambda p, i: self.get("webhook_endpoint", i)),
            ("POST", r"/v1/webhook_endpoints/([^/]+)", self._webhook_endpoint_update),
            ("DELETE", r"/v1/webhook_endpoints/([^/]+)", self._webhook_endpoint_delete),
            ("POST", r"/v1/checkout/sessions", self._checkout_session_create),
            ("GET", r"/v1/checkout/sessions/([^/]+)", lambda p, i: self.get("checkout.session", i)),
            ("POST", r"/v1/billing_portal/sessions", self._portal_session_create),
            ("GET", r"/v1/events/([^/]+)", lambda p, i: self.get("event", i)),
            ("GET", r"/v1/payment_methods/([^/]+)", lambda p, i: self.get("payment_method", i)),
            ("GET", r"/v1/customers/([^/]+)/payment_methods", lambda p, i: self._list(
                "payment_method", p, [m for m in self.all("payment_method") if m.get("customer") == i])),
        ]

    # --- objects ------------------------------------------------------------------------------------

    def _new_id(self, prefix: str) -> str:
        return f"{prefix}_Fake{next(self._ids):06d}{secrets.token_hex(4)}"

    def _from_template(self, kind: str, **fields: Any) -> dict[str, Any]:
        obj = copy.deepcopy(self.templates[kind])
        obj.update(fields)
        return obj

    def store(self, kind: str, obj: dict[str, Any]) -> dict[str, Any]:
        self.objects.setdefault(kind, {})[obj["id"]] = obj
        return obj

    def get(self, kind: str, object_id: str) -> dict[str, Any]:
        obj = self.objects.get(kind, {}).get(object_id)
        if obj is None:
            raise StripeHTTPError(404, f"No such {kind.replace('_', ' ')}: '{object_id}'", code="resource_missing",
                                  param="id")
        return copy.deepcopy(obj)

    def all(self, kind: str) -> list[dict[str, Any]]:
        return [copy.deepcopy(o) for o in self.objects.get(kind, {}).values()]

    def _list(self, kind: str, params: dict[str, Any], items: list[dict[str, Any]] | None = None
              ) -> dict[str, Any]:
        data = items if items is not None else self.all(kind)
        if "customer" in params:
            data = [o for o in data if o.get("customer") == params["customer"]]
        data = sorted(data, key=lambda o: o.get("created") or 0, reverse=True)
        return {"object": "list", "data": data, "has_more": False, "url": f"/v1/{kind}s"}

    def _account(self, account_id: str) -> dict[str, Any]:
        if account_id != self.account["id"]:
            raise StripeHTTPError(404, f"No such account: '{account_id}'", code="resource_missing")
        return self.account

    # products and prices
    def _product_create(self, p: dict[str, Any]) -> dict[str, Any]:
        product_id = p.get("id") or self._new_id("prod")
        if product_id in self.objects.get("product", {}):
            raise StripeHTTPError(400, f"Product already exists: '{product_id}'", code="resource_already_exists")
        now = int(time.time())
        return self.store("product", self._from_template(
            "product", id=product_id, name=p["name"], metadata=p.get("metadata") or {}, created=now, updated=now,
            default_price=None, description=p.get("description"), package_dimensions=None, type="service",
            livemode=False))

    def _product_update(self, p: dict[str, Any], product_id: str) -> dict[str, Any]:
        product = self.objects.get("product", {}).get(product_id)
        if product is None:
            raise StripeHTTPError(404, f"No such product: '{product_id}'", code="resource_missing")
        for key in ("name", "description"):
            if key in p:
                product[key] = p[key]
        product["updated"] = int(time.time())
        return copy.deepcopy(product)

    def _price_create(self, p: dict[str, Any]) -> dict[str, Any]:
        self.get("product", p["product"])
        lookup_key = p.get("lookup_key")
        if lookup_key:
            holders = [x for x in self.objects.get("price", {}).values() if x.get("lookup_key") == lookup_key]
            if holders and not _bool(p.get("transfer_lookup_key")):
                raise StripeHTTPError(400, f"A price (`{holders[0]['id']}`) already uses that lookup key.",
                                      param="lookup_key")
            for holder in holders:
                holder["lookup_key"] = None
        recurring = p.get("recurring") or {}
        amount = int(p["unit_amount"])
        return self.store("price", self._from_template(
            "price", id=self._new_id("price"), product=p["product"], unit_amount=amount,
            unit_amount_decimal=str(amount), currency=p["currency"], lookup_key=lookup_key,
            metadata=p.get("metadata") or {}, created=int(time.time()), active=True, transform_quantity=None,
            recurring={"interval": recurring.get("interval", "month"),
                       "interval_count": int(recurring.get("interval_count", 1)), "meter": None,
                       "usage_type": "licensed", "trial_period_days": None}))

    def _price_list(self, p: dict[str, Any]) -> dict[str, Any]:
        prices = self.all("price")
        if "lookup_keys" in p:
            prices = [x for x in prices if x.get("lookup_key") in p["lookup_keys"]]
        if "active" in p:
            prices = [x for x in prices if x["active"] == _bool(p["active"])]
        if "product" in p:
            prices = [x for x in prices if x["product"] == p["product"]]
        return self._list("price", {}, prices)

    def _price_update(self, p: dict[str, Any], price_id: str) -> dict[str, Any]:
        price = self.objects.get("price", {}).get(price_id)
        if price is None:
            raise StripeHTTPError(404, f"No such price: '{price_id}'", code="resource_missing")
        if "active" in p:
            price["active"] = _bool(p["active"])
        if "metadata" in p:
            price["metadata"].update(p["metadata"])
        return copy.deepcopy(price)

    # customers and sessions
    def _customer_create(self, p: dict[str, Any]) -> dict[str, Any]:
        return self.store("customer", self._from_template(
            "customer", id=self._new_id("cus"), email=p.get("email"), name=p.get("name"),
            metadata=p.get("metadata") or {}, created=int(time.time()), discount=None,
            invoice_prefix=secrets.token_hex(4).upper()))

    def _checkout_session_create(self, p: dict[str, Any]) -> dict[str, Any]:
        if p.get("mode") != "subscription":
            raise StripeHTTPError(400, "This fake only does subscription checkouts.", param="mode")
        self.get("customer", p["customer"])
        price_id = p["line_items"][0]["price"]
        price = self.get("price", price_id)
        if not price["active"]:
            raise StripeHTTPError(400, f"The price `{price_id}` is not active.", param="line_items")
        session_id = self._new_id("cs_test")
        self.session_prices[session_id] = price_id
        now = int(time.time())
        return self.store("checkout.session", self._from_template(
            "checkout.session", id=session_id, mode="subscription", customer=p["customer"],
            success_url=p["success_url"], cancel_url=p.get("cancel_url"),
            client_reference_id=p.get("client_reference_id"), metadata=p.get("metadata") or {},
            url=f"{self.url}/pay/{session_id}", status="open", payment_status="unpaid", payment_intent=None,
            created=now, expires_at=now + 24 * 3600, currency=price["currency"], amount_subtotal=price["unit_amount"],
            amount_total=price["unit_amount"], shipping_address_collection=None, shipping_cost=None,
            total_details=None, currency_conversion=None, after_expiration=None, custom_text=None,
            collected_information=None, invoice_creation=None))

    def _portal_session_create(self, p: dict[str, Any]) -> dict[str, Any]:
        self.get("customer", p["customer"])
        session_id = self._new_id("bps")
        return self.store("billing_portal.session", self._from_template(
            "billing_portal.session", id=session_id, customer=p["customer"], return_url=p.get("return_url"),
            url=f"{self.url}/portal/{session_id}", flow=None, livemode=False, created=int(time.time())))

    # webhook endpoints
    def _webhook_endpoint_create(self, p: dict[str, Any]) -> dict[str, Any]:
        endpoint_id = self._new_id("we")
        secret = f"whsec_{secrets.token_hex(16)}"
        self.webhook_secrets[endpoint_id] = secret
        endpoint = self.store("webhook_endpoint", self._from_template(
            "webhook_endpoint", id=endpoint_id, url=p["url"], enabled_events=p["enabled_events"],
            metadata=p.get("metadata") or {}, api_version=p.get("api_version"), created=int(time.time()),
            description=None, status="enabled"))
        return {**copy.deepcopy(endpoint), "secret": secret}

    def _webhook_endpoint_update(self, p: dict[str, Any], endpoint_id: str) -> dict[str, Any]:
        endpoint = self.objects.get("webhook_endpoint", {}).get(endpoint_id)
        if endpoint is None:
            raise StripeHTTPError(404, f"No such webhook endpoint: '{endpoint_id}'", code="resource_missing")
        for key in ("url", "enabled_events"):
            if key in p:
                endpoint[key] = p[key]
        if "disabled" in p:
            endpoint["status"] = "disabled" if _bool(p["disabled"]) else "enabled"
        return copy.deepcopy(endpoint)

    def _webhook_endpoint_delete(self, p: dict[str, Any], endpoint_id: str) -> dict[str, Any]:
        self.get("webhook_endpoint", endpoint_id)
        del self.objects["webhook_endpoint"][endpoint_id]
        self.webhook_secrets.pop(endpoint_id, None)
        return {"id": endpoint_id, "object": "webhook_endpoint", "deleted": True}

    # invoice items and invoices
    def _invoiceitem_create(self, p: dict[str, Any]) -> dict[str, Any]:
        self.get("customer", p["customer"])
        amount = int(p["amount"])
        period = p.get("period") or {}
        now = int(time.time())
        subscription = p.get("subscription")
        return self.store("invoiceitem", self._from_template(
            "invoiceitem", id=self._new_id("ii"), customer=p["customer"], amount=amount, currency=p["currency"],
            description=p.get("description"), metadata=p.get("metadata") or {}, date=now, invoice=None,
            period={"start": int(period.get("start", now)), "end": int(period.get("end", now))},
            parent={"type": "subscription_details", "subscription_details": {"subscription": subscription}}
            if subscription else None,
            pricing={"type": "price_details", "price_details": None, "unit_amount_decimal": str(amount)},
            net_amount=amount, quantity=1, quantity_decimal="1", proration=False, discounts=[], tax_rates=[]))

    def _invoice_create_now(self, p: dict[str, Any]) -> dict[str, Any]:
        """A draft with the customer's pending items, as Stripe creates it."""
        invoice = self._invoice_build(customer_id=p["customer"], subscription_id=None, lines=[],
                                      billing_reason="manual", period=(int(time.time()), int(time.time())))
        invoice.update(status="draft", metadata=p.get("metadata") or {}, description=p.get("description"))
        invoice["status_transitions"]["finalized_at"] = None
        return copy.deepcopy(invoice)

    def _invoice_finalize(self, p: dict[str, Any], invoice_id: str) -> dict[str, Any]:
        invoice = self.get("invoice", invoice_id)
        if invoice["status"] != "draft":
            raise StripeHTTPError(400, f"Invoice {invoice_id} is already finalized.", code="invoice_not_editable")
        invoice = self.objects["invoice"][invoice_id]
        invoice["status"] = "open"
        invoice["status_transitions"]["finalized_at"] = int(time.time())
        return copy.deepcopy(invoice)

    def _customer_update(self, p: dict[str, Any], customer_id: str) -> dict[str, Any]:
        self.get("customer", customer_id)
        customer = self.objects["customer"][customer_id]
        if "invoice_settings" in p:
            customer["invoice_settings"] = {**(customer.get("invoice_settings") or {}), **p["invoice_settings"]}
        return copy.deepcopy(customer)

    # --- Stripe-side happenings (each returns the events Stripe would send) ------------------------------

    def _subscription_item(self, subscription_id: str, price: dict[str, Any], start: int, end: int
                           ) -> dict[str, Any]:
        item = self._from_template("subscription_item", id=self._new_id("si"), subscription=subscription_id,
                                   price=price, current_period_start=start, current_period_end=end,
                                   created=start, quantity=1, billing_thresholds=None, discounts=[], tax_rates=[])
        item.pop("plan", None)  # the legacy Plan mirror; dj-stripe 2.11 reads prices only
        return item

    def _set_item(self, sub: dict[str, Any], price_id: str, start: int, end: int) -> None:
        item = self._subscription_item(sub["id"], self.get("price", price_id), start, end)
        if sub["items"]["data"]:
            item["id"] = sub["items"]["data"][0]["id"]
        sub["items"] = {"object": "list", "data": [item], "has_more": False,
                        "url": f"/v1/subscription_items?subscription={sub['id']}"}
        self.store("subscription_item", copy.deepcopy(item))

    def _invoice_build(self, *, customer_id: str, subscription_id: str | None, lines: list[dict[str, Any]],
                       billing_reason: str, period: tuple[int, int]) -> dict[str, Any]:
        invoice_id = self._new_id("in")
        pending = [ii for ii in self.objects.get("invoiceitem", {}).values()
                   if ii["customer"] == customer_id and ii["invoice"] is None]
        all_lines = list(lines)
        for ii in pending:
            ii["invoice"] = invoice_id
            all_lines.append(self._line(invoice_id, amount=ii["amount"], description=ii["description"],
                                        period=ii["period"], parent={
                                            "type": "invoice_item_details",
                                            "invoice_item_details": {"invoice_item": ii["id"], "proration": False,
                                                                     "proration_details": {"credited_items": None},
                                                                     "subscription": subscription_id},
                                            "subscription_item_details": None}))
        for line in all_lines:
            line["invoice"] = invoice_id
        total = sum(line["amount"] for line in all_lines)
        now = int(time.time())
        invoice = self._from_template(
            "invoice", id=invoice_id, customer=customer_id, status="open", billing_reason=billing_reason,
            amount_due=total, amount_paid=0, amount_remaining=total, subtotal=total, subtotal_excluding_tax=total,
            total=total, total_excluding_tax=total, created=now, period_start=period[0], period_end=period[1],
            due_date=None, effective_at=now, next_payment_attempt=None, attempt_count=0, attempted=False,
            webhooks_delivered_at=None, from_invoice=None, last_finalization_error=None, shipping_cost=None,
            amount_overpaid=0, number=f"FAKE-{next(self._ids):04d}", auto_advance=True,
            status_transitions={"finalized_at": now, "marked_uncollectible_at": None, "paid_at": None,
                                "voided_at": None},
            parent={"type": "subscription_details", "quote_details": None,
                    "subscription_details": {"metadata": {}, "subscription": subscription_id}}
            if subscription_id else None,
            lines={"object": "list", "data": all_lines, "has_more": False, "url": f"/v1/invoices/{invoice_id}/lines"})
        return self.store("invoice", invoice)

    def _line(self, invoice_id: str, *, amount: int, description: str, period: dict[str, int],
              parent: dict[str, Any]) -> dict[str, Any]:
        line = self._from_template("line_item", id=self._new_id("il"), invoice=invoice_id, amount=amount,
                                   description=description, period=dict(period), parent=parent, subtotal=amount,
                                   discount_amounts=[], discounts=[])
        line["pricing"] = {"type": "price_details", "price_details": None, "unit_amount_decimal": str(amount)}
        return line

    def _subscription_line(self, sub: dict[str, Any], invoice_placeholder: str = "") -> dict[str, Any]:
        item = sub["items"]["data"][0]
        return self._line(invoice_placeholder, amount=item["price"]["unit_amount"],
                          description=f"1 × {item['price']['product']}",
                          period={"start": item["current_period_start"], "end": item["current_period_end"]},
                          parent={"type": "subscription_item_details", "invoice_item_details": None,
                                  "subscription_item_details": {
                                      "invoice_item": None, "proration": False,
                                      "proration_details": {"credited_items": None},
                                      "subscription": sub["id"], "subscription_item": item["id"]}})

    def event(self, event_type: str, obj: dict[str, Any], *, previous: dict[str, Any] | None = None,
              created: int | None = None) -> dict[str, Any]:
        data: dict[str, Any] = {"object": copy.deepcopy(obj)}
        if previous is not None:
            data["previous_attributes"] = previous
        event = {"id": self._new_id("evt"), "object": "event", "api_version": API_VERSION,
                 "created": created or int(time.time()), "data": data, "livemode": False, "pending_webhooks": 1,
                 "request": {"id": None, "idempotency_key": None}, "type": event_type}
        with self.lock:
            self.store("event", event)
        return copy.deepcopy(event)

    def checkout_complete(self, session_id: str, *, pay: bool = True, start: int | None = None,
                          end: int | None = None) -> list[dict[str, Any]]:
        """The customer paid the Checkout: a subscription and its first invoice."""
        with self.lock:
            session = self.objects["checkout.session"][session_id]
            start = start or int(time.time())
            price_id = self.session_prices[session_id]
            end = end or period_end(start, self.get("price", price_id)["recurring"]["interval"])
            sub_id = self._new_id("sub")
            sub = self._from_template(
                "subscription", id=sub_id, customer=session["customer"], status="active" if pay else "incomplete",
                created=start, start_date=start, billing_cycle_anchor=start, cancel_at=None, canceled_at=None,
                ended_at=None, trial_end=None, trial_start=None, cancel_at_period_end=False, pending_update=None,
                transfer_data=None, pause_collection=None, next_pending_invoice_item_invoice=None,
                pending_invoice_item_interval=None, billing_thresholds=None, billing_schedules=[],
                billing_cycle_anchor_config=None, metadata=session.get("metadata") or {}, discounts=[],
                latest_invoice=None, schedule=None, test_clock=None, managed_payments=None)
            self._set_item(sub, price_id, start, end)
            invoice = self._invoice_build(customer_id=sub["customer"], subscription_id=sub_id,
                                          lines=[self._subscription_line(sub)], billing_reason="subscription_create",
                                          period=(start, start))
            sub["latest_invoice"] = invoice["id"]
            if pay:
                self._mark_paid(invoice)
            session.update(status="complete", payment_status="paid" if pay else "unpaid", subscription=sub_id,
                           invoice=invoice["id"])
            self.store("subscription", sub)
            events = [self.event("customer.subscription.created", sub)]
            events.append(self.event("invoice.payment_succeeded" if pay else "invoice.payment_failed", invoice))
            return events

    def _subscription_update(self, p: dict[str, Any], sub_id: str) -> dict[str, Any]:
        """POST /v1/subscriptions/{id} with items=[{id, price}]: the item moves to the price now,
        its period stays. Prorations as Stripe makes them: `always_invoice` invoices (and charges)
        the difference for the rest of the period at once, `create_prorations` leaves it as a
        pending invoice item for the next invoice, `none` makes none. Stripe's
        `customer.subscription.updated` (and the proration invoice's payment) go to `outbox`."""
        sub = self.objects.get("subscription", {}).get(sub_id)
        if sub is None:
            raise StripeHTTPError(404, f"No such subscription: '{sub_id}'", code="resource_missing", param="id")
        if sub["status"] in ("canceled", "incomplete_expired"):
            raise StripeHTTPError(400, "A canceled subscription can only update its cancellation_details and "
                                       "metadata.", param="items")
        behavior = p.get("proration_behavior", "create_prorations")
        if behavior not in ("always_invoice", "create_prorations", "none"):
            raise StripeHTTPError(400, f"Invalid proration_behavior: {behavior}", param="proration_behavior")
        previous = {"items": copy.deepcopy(sub["items"])}
        proration = 0
        for i, change in enumerate(p.get("items") or []):
            item = sub["items"]["data"][0]
            if change.get("id") != item["id"]:
                raise StripeHTTPError(400, f"No such subscription item: '{change.get('id')}'",
                                      code="resource_missing", param=f"items[{i}][id]")
            if "price" not in change:
                continue
            price = self.get("price", change["price"])
            if not price["active"]:
                raise StripeHTTPError(400, f"The price `{price['id']}` is not active.", param=f"items[{i}][price]")
            start, end = item["current_period_start"], item["current_period_end"]
            left = max(0.0, (end - time.time()) / (end - start)) if end > start else 0.0
            proration = round((price["unit_amount"] - item["price"]["unit_amount"]) * left)
            self.subscription_updates.append({"subscription": sub_id, "item": item["id"],
                                              "from_price": item["price"]["id"], "price": price["id"],
                                              "proration_behavior": behavior, "proration": proration})
            self._set_item(sub, price["id"], start, end)
        if "metadata" in p:
            sub["metadata"] = {**(sub.get("metadata") or {}), **p["metadata"]}
        events = [self.event("customer.subscription.updated", sub, previous=previous)]
        if proration and behavior == "always_invoice":
            item = sub["items"]["data"][0]
            line = self._line("", amount=proration, description="Remaining time at the new price (prorated)",
                              period={"start": int(time.time()), "end": item["current_period_end"]},
                              parent={"type": "subscription_item_details", "invoice_item_details": None,
                                      "subscription_item_details": {
                                          "invoice_item": None, "proration": True,
                                          "proration_details": {"credited_items": None},
                                          "subscription": sub_id, "subscription_item": item["id"]}})
            invoice = self._invoice_build(customer_id=sub["customer"], subscription_id=sub_id, lines=[line],
                                          billing_reason="subscription_update",
                                          period=(int(time.time()), int(time.time())))
            self._mark_paid(invoice)
            sub["latest_invoice"] = invoice["id"]
            events.append(self.event("invoice.payment_succeeded", invoice))
        elif proration and behavior == "create_prorations":
            self._invoiceitem_create({"customer": sub["customer"], "amount": str(proration),
                                      "currency": sub["items"]["data"][0]["price"]["currency"],
                                      "description": "Remaining time at the new price (prorated)",
                                      "subscription": sub_id})
        self.outbox.extend(events)
        return copy.deepcopy(sub)

    def take_events(self) -> list[dict[str, Any]]:
        """The events Stripe sent because of API calls since the last take (see `outbox`)."""
        with self.lock:
            events, self.outbox = self.outbox, []
            return events

    def _mark_paid(self, invoice: dict[str, Any]) -> None:
        now = int(time.time())
        invoice.update(status="paid", amount_paid=invoice["amount_due"], amount_remaining=0, attempted=True,
                       attempt_count=invoice["attempt_count"] + 1)
        invoice["status_transitions"]["paid_at"] = now

    def subscription_change_price(self, sub_id: str, price_id: str) -> list[dict[str, Any]]:
        """A plan change in the portal: the price changes now and the period stays; a change
        of interval (monthly <-> yearly) resets the billing cycle anchor to now, starts a new
        period and invoices it at once (prorated), as Stripe does."""
        with self.lock:
            sub = self.objects["subscription"][sub_id]
            item = sub["items"]["data"][0]
            previous = {"items": copy.deepcopy(sub["items"])}
            interval = self.get("price", price_id)["recurring"]["interval"]
            if interval == item["price"]["recurring"]["interval"]:
                self._set_item(sub, price_id, item["current_period_start"], item["current_period_end"])
                return [self.event("customer.subscription.updated", sub, previous=previous)]
            start = int(time.time())
            self._set_item(sub, price_id, start, period_end(start, interval))
            sub["billing_cycle_anchor"] = start
            invoice = self._invoice_build(customer_id=sub["customer"], subscription_id=sub_id,
                                          lines=[self._subscription_line(sub)], billing_reason="subscription_update",
                                          period=(start, start))
            self._mark_paid(invoice)
            sub["latest_invoice"] = invoice["id"]
            return [self.event("customer.subscription.updated", sub, previous=previous),
                    self.event("invoice.payment_succeeded", invoice)]

    def customer_payment_method(self, customer_id: str, *, saved: bool = True) -> dict[str, Any]:
        """The customer saved a card as the default for invoices (or removed it): `customer.updated`."""
        with self.lock:
            customer = self.objects["customer"][customer_id]
            payment_method = None
            if saved:
                payment_method = self._new_id("pm")
                self.store("payment_method", self._from_template(
                    "payment_method", id=payment_method, customer=customer_id, created=int(time.time())))
            previous = {"invoice_settings": copy.deepcopy(customer.get("invoice_settings") or {})}
            customer["invoice_settings"] = {**(customer.get("invoice_settings") or {}),
                                            "default_payment_method": payment_method}
            return self.event("customer.updated", customer, previous=previous)

    def subscription_renew(self, sub_id: str, *, pay: bool = True, start: int | None = None) -> list[dict[str, Any]]:
        """The period ended: a new period starts and its invoice (with the customer's pending
        invoice items) is charged."""
        with self.lock:
            sub = self.objects["subscription"][sub_id]
            item = sub["items"]["data"][0]
            start = start or int(time.time())
            end = period_end(start, item["price"]["recurring"]["interval"])
            previous = {"items": copy.deepcopy(sub["items"]), "status": sub["status"]}
            self._set_item(sub, item["price"]["id"], start, end)
            invoice = self._invoice_build(customer_id=sub["customer"], subscription_id=sub_id,
                                          lines=[self._subscription_line(sub)], billing_reason="subscription_cycle",
                                          period=(item["current_period_start"], start))
            sub["latest_invoice"] = invoice["id"]
            if pay:
                self._mark_paid(invoice)
                sub["status"] = "active"
            else:
                invoice.update(attempted=True, attempt_count=1, next_payment_attempt=start + 3 * 24 * 3600)
                sub["status"] = "past_due"
            return [self.event("customer.subscription.updated", sub, previous=previous),
                    self.event("invoice.payment_succeeded" if pay else "invoice.payment_failed", invoice)]

    def invoice_pay(self, invoice_id: str) -> list[dict[str, Any]]:
        """A retried (or manually paid) invoice succeeds."""
        with self.lock:
            invoice = self.objects["invoice"][invoice_id]
            self._mark_paid(invoice)
            events = [self.event("invoice.payment_succeeded", invoice)]
            sub_id = ((invoice.get("parent") or {}).get("subscription_details") or {}).get("subscription")
            if sub_id:
                sub = self.objects["subscription"][sub_id]
                if sub["status"] == "past_due":
                    sub["status"] = "active"
                    events.append(self.event("customer.subscription.updated", sub, previous={"status": "past_due"}))
            return events

    def subscription_cancel(self, sub_id: str) -> list[dict[str, Any]]:
        """Canceled now (the paid period is not refunded)."""
        with self.lock:
            sub = self.objects["subscription"][sub_id]
            now = int(time.time())
            sub.update(status="canceled", canceled_at=now, ended_at=now)
            return [self.event("customer.subscription.deleted", sub)]

    def upcoming_invoice_event(self, sub_id: str) -> dict[str, Any]:
        """`invoice.upcoming`: a preview of the next invoice, which has no id yet."""
        with self.lock:
            sub = self.objects["subscription"][sub_id]
            preview = self._from_template("invoice", customer=sub["customer"], status="draft",
                                          billing_reason="upcoming", lines={"object": "list", "data": [],
                                                                            "has_more": False, "url": ""})
            preview.pop("id")
            preview["parent"] = {"type": "subscription_details", "quote_details": None,
                                 "subscription_details": {"metadata": {}, "subscription": sub_id}}
            return self.event("invoice.upcoming", preview)

    # --- webhooks to the app ---------------------------------------------------------------------------

    def sign(self, payload: str, secret: str, *, timestamp: int | None = None) -> str:
        timestamp = timestamp or int(time.time())
        signature = hmac.new(secret.encode(), f"{timestamp}.{payload}".encode(), hashlib.sha256).hexdigest()
        return f"t={timestamp},v1={signature}"

    def deliver(self, event: dict[str, Any], *, endpoint_id: str | None = None, secret: str | None = None,
                signature: str | None = None) -> tuple[int, str]:
        """POST the event to our webhook endpoint, signed as Stripe signs it; (status, body)."""
        endpoints = self.all("webhook_endpoint")
        endpoint = next(e for e in endpoints if endpoint_id in (None, e["id"]))
        if event["type"] not in endpoint["enabled_events"]:
            raise AssertionError(f"endpoint is not subscribed to {event['type']}")
        payload = json.dumps(event)
        signature = signature or self.sign(payload, secret or self.webhook_secrets[endpoint["id"]])
        request = urllib.request.Request(endpoint["url"], data=payload.encode(), method="POST", headers={
            "Content-Type": "application/json; charset=utf-8", "Stripe-Signature": signature,
            "User-Agent": "Stripe/1.0 (+fake)"})
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    # --- what tests look at ----------------------------------------------------------------------------

    def calls_to(self, method: str, pattern: str) -> list[Call]:
        return [c for c in self.calls if c.method == method and re.fullmatch(pattern, c.path)]

