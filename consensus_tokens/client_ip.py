"""The client's IP address: the one home of the rule, for audit rows, request logs and every
per-IP limit (django-ratelimit reads it through RATELIMIT_IP_META_KEY).

Behind a load balancer REMOTE_ADDR is the balancer, and the client is in X-Forwarded-For,
which anybody can also write. So the header is read only when the peer (REMOTE_ADDR) is a
proxy we trust, and only from the right, the end our proxies append to:

- `TRUSTED_PROXIES`: the proxies' addresses (IPs or CIDR networks, any of a balancer's
  nodes). Unset: any peer counts as a proxy if `TRUSTED_PROXY_COUNT` says there are some.
- `TRUSTED_PROXY_COUNT`: how many proxies a request passes, the peer included (default 1
  when `TRUSTED_PROXIES` is set, else 0: no forwarded header is ever read).

Going from the peer leftwards at most TRUSTED_PROXY_COUNT hops, the first address that is not
a trusted proxy is the client (what our outermost proxy saw); entries further left were
written by the client and are never used. django-ipware parses the header (ports, brackets,
IPv4-mapped IPv6, junk entries) and picks the hop at each position (`proxy_count`); it does
not look at the peer itself, which is why the peer check is here.
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from functools import lru_cache

from django.conf import settings
from django.core.checks import Error, register
from django.core.exceptions import ImproperlyConfigured
from ipware import get_client_ip

# The header our proxies append to. Others (X-Real-IP, CDN headers) are not read: a proxy that
# passes them through unchanged would let the client pick its address.
FORWARDED_HEADER = "HTTP_X_FORWARDED_FOR"

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class ProxyTrust:
    networks: tuple[Network, ...]
    count: int

    def trusts(self, address: str) -> bool:
        """Whether `address` may be one of our proxies (without a list, the count alone decides)."""
        if not self.networks:
            return True
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip.version == net.version and ip in net for net in self.networks)


@lru_cache(maxsize=8)
def _trust(proxies: tuple[str, ...], count: int | None) -> ProxyTrust:
    networks = []
    for entry in proxies:
        entry = entry.strip()
        if not entry:
            continue
        try:
            networks.append(ipaddress.ip_network(entry, strict=False))
        except ValueError as error:
            raise ImproperlyConfigured(f"TRUSTED_PROXIES: {entry!r} is not an IP address or CIDR network") from error
    if count is None:
        count = 1 if networks else 0
    if count < 0:
        raise ImproperlyConfigured("TRUSTED_PROXY_COUNT must be 0 or more")
    return ProxyTrust(networks=tuple(networks), count=count)


def proxy_trust() -> ProxyTrust:
    """The trusted-proxy settings, parsed (and checked: a bad entry raises ImproperlyConfigured)."""
    proxies = getattr(settings, "TRUSTED_PROXIES", ())
    if isinstance(proxies, str):
        proxies = proxies.split(",")
    return _trust(tuple(proxies), getattr(settings, "TRUSTED_PROXY_COUNT", None))


def client_ip(request) -> str:
    """The client's address: REMOTE_ADDR, or, from a trusted proxy, the first untrusted hop of
    X-Forwarded-For counted from the right ("" when the request has no address at all)."""
    meta = request.META
    peer = meta.get("REMOTE_ADDR") or ""
    trust = proxy_trust()
    if not peer or trust.count == 0 or not trust.trusts(peer):
        return peer
    address = peer
    for hops in range(trust.count):  # hops: the proxies named in the header after the one we want
        found, _routable = get_client_ip(request, proxy_count=hops, request_header_order=(FORWARDED_HEADER,),
                                         strict=False)
        if found is None:  # no header, or shorter than that: the last proxy we trust saw `address`
            break
        address = found
        if not trust.trusts(found):
            break
    return address


@register()
def check_trusted_proxies(app_configs=None, **kwargs) -> list[Error]:
    """A bad TRUSTED_PROXIES entry stops start-up (at request time it would fail every per-IP limit open)."""
    try:
        proxy_trust()
    except ImproperlyConfigured as error:
        return [Error(str(error), id="consensus_tokens.E010")]
    return []
