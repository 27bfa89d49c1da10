"""Who may call, and what a request may look like before anything acts on
it: the Host / Origin checks against DNS rebinding and browser CSRF
(DESIGN.md, "Proxy port: who may call it"), path normalisation and the
request limits answered with JSON."""
from __future__ import annotations

import ipaddress

from .replies import sidecar_error
from .server import Reply, Request

# The proxy port is a loopback service (DESIGN.md, "Proxy port: who may call
# it"): a Host naming anything else is a browser led there by DNS rebinding.
LOOPBACK_NAMES = frozenset({"localhost"})


def host_of(authority: str) -> str | None:
    """The host of a Host value or an Origin's authority (port dropped,
    lower case); None when it is not of that form."""
    authority = authority.strip().lower()
    if authority.startswith("["):
        host, bracket, rest = authority[1:].partition("]")
        if not bracket or (rest and not (rest[:1] == ":" and rest[1:].isdigit())):
            return None
        return host
    host, colon, port = authority.partition(":")
    if colon and not port.isdigit():
        return None
    return host or None


def is_ip_literal(host: str) -> bool:
    """An address, not a name: DNS rebinding needs a name to rebind."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def is_loopback_host(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Callers:
    """Who may call one listener, from what a browser sends: its Host must
    name this sidecar (a loopback name or address, the listener's configured
    names, and on the admin port any IP literal: the kubelet and Prometheus
    use the pod's address), and a cross-site Origin or Sec-Fetch-Site is a web
    page's request (DNS rebinding, CSRF). One mechanism for the proxy and the
    admin port; each says in its refusals which names it serves."""

    # Verdicts kept by raw Host value: a few distinct values ever reach a port.
    MAX_VERDICTS = 64

    def __init__(self, port: str, names: tuple[str, ...], ip_literals: bool, serves: str):
        self.port, self.serves, self.ip_literals = port, serves, ip_literals
        self.names = frozenset(name.lower().strip("[]") for name in names)
        self.verdicts: dict[str | bytes, bool] = {}     # raw Host/authority -> allowed (read on the request path)

    def allowed(self, authority: str | bytes) -> bool:
        verdict = self.verdicts.get(authority)
        if verdict is None:
            host = host_of(authority.decode("latin-1") if isinstance(authority, bytes) else authority)
            verdict = host is not None and (host in self.names or is_loopback_host(host)
                                            or (self.ip_literals and is_ip_literal(host)))
            if len(self.verdicts) >= self.MAX_VERDICTS:
                self.verdicts.clear()
            self.verdicts[authority] = verdict
        return verdict

    def refusal(self, host: str | bytes | None, origin: str | bytes | None,
                fetch_site: str | bytes | None) -> str | None:
        """Why a request is refused (403), or None. `host` None: not checked."""
        if origin is None and fetch_site is None and (host is None or self.verdicts.get(host) is True):
            return None                              # the usual call: a known Host, no browser headers
        if host is not None and not self.allowed(host):
            shown = host[:64].decode("latin-1") if isinstance(host, bytes) else host[:64]
            return f"Host {shown!r} is not this sidecar: the {self.port} serves {self.serves} only"
        if origin is not None:
            text = origin.decode("latin-1") if isinstance(origin, bytes) else origin
            scheme, sep, authority = text.partition("://")
            if not sep or scheme.lower() not in ("http", "https") or not self.allowed(authority):
                return f"cross-site Origin refused: the {self.port} is not for web pages"
        if fetch_site is not None:
            site = fetch_site.decode("latin-1") if isinstance(fetch_site, bytes) else fetch_site
            if site.strip().lower() == "cross-site":
                return "cross-site request refused (Sec-Fetch-Site: cross-site)"
        return None


# Request limits answered with JSON before anything is forwarded. The proxy
# port's server has hard limits above these (server.py: JSON 414/431,
# and the connection closed).
MAX_URL_BYTES = 8192          # like nginx's large_client_header_buffers 8k
MAX_HEADER_COUNT = 100        # like Apache's LimitRequestFields
MAX_HEADER_BYTES = 32 * 1024

# Path bytes that WeChat paths never contain and that could change where a
# path points once a server decodes it: encoded slashes, backslashes, NUL.
_FORBIDDEN_IN_PATH = ("\\", "%5c", "%5C", "%2f", "%2F", "%00", "\x00")


def normalize_path(raw: str) -> str | None:
    """Resolve `.`/`..` (also as %2e), collapse `//`; None when the path
    escapes the root or carries bytes that could be decoded into a new path."""
    if raw[:1] != "/":
        return None
    if "/." not in raw and "//" not in raw and "%" not in raw and "\\" not in raw:
        return raw   # the common case: nothing to resolve
    if any(bad in raw for bad in _FORBIDDEN_IN_PATH):
        return None
    out: list[str] = []
    for segment in raw.split("/")[1:]:
        plain = segment.replace("%2e", ".").replace("%2E", ".")
        if plain in ("", "."):
            continue
        if plain == "..":
            if not out:
                return None
            out.pop()
            continue
        out.append(segment)
    path = "/" + "/".join(out)
    return path + "/" if raw.endswith("/") and out else path


def check_request(request: Request) -> Reply | None:
    """Refuse what must never be forwarded: CONNECT, absolute-form targets
    (an open proxy), and requests over the size limits."""
    if request.method == "CONNECT":
        return sidecar_error(405, "CONNECT is not supported: this is not a forward proxy",
                             outcome="bad_request")
    if request.method == "TRACE":
        # TRACE echoes the request, headers and all, back (RFC 9110 §9.3.8):
        # nothing WeChat offers needs it.
        return sidecar_error(405, "TRACE is not supported", outcome="bad_request")
    raw = request.target
    if raw[:1] != "/":
        return sidecar_error(400, "absolute-form or malformed request target: send the path only, "
                                  "the sidecar picks the upstream", outcome="bad_request")
    if request.head_bytes <= MAX_URL_BYTES and len(request.raw_headers) <= MAX_HEADER_COUNT:
        return None                    # within every limit below (the head's bytes include the URL's)
    if len(raw) > MAX_URL_BYTES:
        return sidecar_error(414, f"URL longer than {MAX_URL_BYTES} bytes", outcome="bad_request")
    if len(request.raw_headers) > MAX_HEADER_COUNT:
        return sidecar_error(431, f"more than {MAX_HEADER_COUNT} request headers", outcome="bad_request")
    if request.head_bytes - len(raw) > MAX_HEADER_BYTES:
        return sidecar_error(431, f"request headers larger than {MAX_HEADER_BYTES} bytes", outcome="bad_request")
    return None
