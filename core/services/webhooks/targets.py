"""Where a webhook may go: the target URL taken apart and checked, and the SSRF guard.

A URL must be https to a dotted DNS name, unless DQ_WEBHOOK_ALLOW_HTTP or
DQ_WEBHOOK_ALLOWED_NETWORKS allows more. Its host is resolved and every address checked: one that
is not public (loopback, private, link-local, cloud metadata …) is refused unless
DQ_WEBHOOK_ALLOWED_NETWORKS names it. Submission checks without requiring the name to resolve;
every try of a delivery (:func:`core.services.webhooks.delivery.send`) resolves and checks again,
and connects only to an address that was checked.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from core.runtime.settings import Settings
from core.services.jobs import JobRequestError, WebhookTarget

EVENTS = ("start", "completed", "failed", "canceled")
MAX_URL_LENGTH = 2048

# Cloud metadata services, named though they are link-local or private anyway.
METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(a) for a in ("169.254.169.254", "fd00:ec2::254", "100.100.100.200")
)

# --- the URL's syntax -------------------------------------------------------------------------
#
# Written without look-around, so that the same pattern reads alike in Python and in the API
# document's JSON Schema. ``WEBHOOK_URL_PATTERN`` is what any server accepts without settings:
# https to a dotted DNS name. ``_ANY_URL`` adds http and IP or single-label hosts, which are
# accepted only where DQ_WEBHOOK_ALLOW_HTTP or DQ_WEBHOOK_ALLOWED_NETWORKS allow them.
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_TLD = r"(?:[A-Za-z]{2,63}|xn--[A-Za-z0-9-]{1,59})"
_DNS_NAME = rf"(?:{_LABEL}\.)+{_TLD}"
_PORT = r"(?:[1-9][0-9]{0,3}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5])"
_PCHAR = r"(?:[A-Za-z0-9._~!$&'()*+,;=:@-]|%[0-9A-Fa-f]{2})"
_REST = rf"(?::{_PORT})?(?:/(?:{_PCHAR}|/)*)?(?:\?(?:{_PCHAR}|[/?])*)?"
WEBHOOK_URL_PATTERN = rf"^https://{_DNS_NAME}{_REST}$"
_IPV4 = r"[0-9]{1,3}(?:\.[0-9]{1,3}){3}"
_IPV6 = r"\[[0-9A-Fa-f:.]+\]"
_ANY_URL = re.compile(
    rf"(?P<scheme>https?)://(?P<host>{_DNS_NAME}|{_LABEL}|{_IPV4}|{_IPV6}){_REST}"
)
_NAMED = re.compile(_DNS_NAME)


Resolver = Callable[[str, int], Sequence[str]]


def resolve(host: str, port: int) -> list[str]:
    """Every address ``host`` resolves to (an IP literal resolves to itself)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    seen: list[str] = []
    for *_, sockaddr in infos:
        address = str(sockaddr[0])
        if address not in seen:
            seen.append(address)
    return seen


def allowed_networks(settings: Settings) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    return [
        ipaddress.ip_network(part, strict=False)
        for part in settings.webhook_allowed_networks.split(",")
        if part.strip()
    ]


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    address = ipaddress.ip_address(text.split("%", 1)[0])  # drop an IPv6 zone
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _in(address: Any, networks: Iterable[Any]) -> bool:
    return any(address.version == n.version and address in n for n in networks)


def forbidden_kind(address: Any) -> str | None:
    """Why ``address`` is no place for a webhook (None: a public address)."""
    if address in METADATA_ADDRESSES:
        return "cloud metadata"
    for kind in ("loopback", "private", "link_local", "multicast", "reserved", "unspecified"):
        if getattr(address, f"is_{kind}"):
            return kind.replace("_", "-")
    if not address.is_global:  # shared (100.64/10), documentation, benchmarking …
        return "special-purpose"
    return None


@dataclass(frozen=True)
class Target:
    """A webhook URL taken apart, and the addresses it may be sent to."""

    scheme: str
    host: str
    port: int
    path: str  # with the query
    addresses: tuple[str, ...]


def _parse(url: object, field: str = "webhook") -> tuple[str, str, int, str, bool]:
    """(scheme, host, port, path with query, host is a dotted DNS name)."""
    if not isinstance(url, str):
        raise JobRequestError(field, "must be a string")
    if len(url) > MAX_URL_LENGTH:
        raise JobRequestError(field, f"is {len(url)} characters; the limit is {MAX_URL_LENGTH}")
    if _ANY_URL.fullmatch(url) is None:
        if "@" in url.partition("://")[2].partition("/")[0]:
            raise JobRequestError(field, "must not carry credentials (user:password@)")
        raise JobRequestError(
            field,
            "must be an absolute https URL to a host name, e.g. https://example.com/hook "
            "(no credentials, no fragment, ASCII only)",
        )
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return parts.scheme, host, port, path, _NAMED.fullmatch(host) is not None


def check_target(
    url: object,
    settings: Settings,
    *,
    resolver: Resolver = resolve,
    require_resolution: bool = True,
    field: str = "webhook",
) -> Target:
    """The target of ``url`` with the addresses it resolves to, all of them checked; raises
    JobRequestError naming ``field``.

    Every address must be public or inside DQ_WEBHOOK_ALLOWED_NETWORKS. Plain http needs
    DQ_WEBHOOK_ALLOW_HTTP or a target inside the allowed networks, and so does a host given as
    an IP address or a single-label name. A dotted name that does not resolve is refused only
    with ``require_resolution`` (at delivery); at submission it is accepted, because every try
    resolves and checks again.
    """
    scheme, host, port, path, named = _parse(url, field)
    networks = allowed_networks(settings)
    try:
        addresses = list(resolver(host, port))
    except (OSError, UnicodeError) as e:
        if require_resolution or not named:
            raise JobRequestError(field, f"the host {host} does not resolve ({e})") from None
        addresses = []
    parsed = []
    for text in addresses:
        address = _address(text)
        parsed.append(address)
        kind = forbidden_kind(address)
        if kind is not None and not _in(address, networks):
            raise JobRequestError(
                field,
                f"{host} resolves to {address}, a {kind} address; webhooks go only to public "
                "addresses, or to networks that DQ_WEBHOOK_ALLOWED_NETWORKS names",
            )
    allow_listed = bool(parsed) and all(_in(a, networks) for a in parsed)
    if not named and not allow_listed:
        raise JobRequestError(
            field,
            "must name its host by a dotted DNS name; an IP address or a single-label host is "
            "accepted only inside DQ_WEBHOOK_ALLOWED_NETWORKS",
        )
    if scheme == "http" and not (settings.webhook_allow_http or allow_listed):
        raise JobRequestError(
            field,
            "must use https (plain http only where DQ_WEBHOOK_ALLOW_HTTP is set, or to networks "
            "that DQ_WEBHOOK_ALLOWED_NETWORKS names)",
        )
    return Target(scheme, host, port, path, tuple(addresses))


def validate_target(
    url: object,
    events: object,
    settings: Settings,
    *,
    resolver: Resolver = resolve,
) -> WebhookTarget:
    """A submitted ``webhook`` and ``webhook_events_filter`` as a WebhookTarget; JobRequestError
    names the field at fault (the API answers 422)."""
    check_target(url, settings, resolver=resolver, require_resolution=False)
    assert isinstance(url, str)
    if events is None:
        return WebhookTarget(url, None)
    if not isinstance(events, (list, tuple)) or not all(isinstance(e, str) for e in events):
        raise JobRequestError("webhook_events_filter", "must be a list of event names")
    unknown = sorted(set(events) - set(EVENTS))
    if unknown:
        raise JobRequestError(
            "webhook_events_filter",
            f"{', '.join(unknown)} is not an event; choose from {', '.join(EVENTS)}",
        )
    if not events:
        raise JobRequestError("webhook_events_filter", "must name at least one event")
    return WebhookTarget(url, tuple(e for e in EVENTS if e in events))
