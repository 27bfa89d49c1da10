"""The config's shape: frozen dataclasses, their defaults (each with its
reason), and ConfigError."""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field

from ..http.allow import AllowList

# Upload bodies are buffered so a replay sends the same bytes. The largest
# documented upload is WeCom's 20 MB `file`; 32 MiB covers it plus multipart
# overhead (wechat-api-notes.md §7).
DEFAULT_MAX_BODY_BYTES = 32 * 1024 * 1024

# stable_token only hands out a new token in the last 300 s of the old one's
# life (wechat-api-notes.md §1.2), so the default proactive margin sits inside it.
DEFAULT_REFRESH_BEFORE_S = 240

# Refreshes forced by rejected tokens are at least this far apart while they
# help; futile ones (a token rejected before it served a call) back off
# exponentially from there (proxy/tokens/policy.py). A second keeps a storm
# of 40001 from becoming a storm of fetches, yet follows another system that
# rotates the token every few seconds; the daily fetch cap
# (store.daily_fetch_cap) is the hard limit.
DEFAULT_MIN_REFRESH_INTERVAL_S = 1.0

# Token fetches per credential per day across the cluster: well under the
# 2000 a day of /cgi-bin/token (wechat-api-notes.md §3).
DEFAULT_DAILY_FETCH_CAP = 1000

# SIGTERM: in-flight calls get this long to finish. The Pod's whole budget
# is terminationGracePeriodSeconds (30 s by default); ~5 s is what the
# Kubernetes sidecar checklist asks of a sidecar.
DEFAULT_SHUTDOWN_GRACE_S = 5.0

# A client connection that has not sent a whole request (headers, or its
# body) within this many seconds is closed: slow clients cannot pin sockets.
DEFAULT_CLIENT_TIMEOUT_S = 15.0
# How often the config file and secret files are checked for changes
# (a Kubernetes ConfigMap or Secret update); 0 turns it off.
DEFAULT_RELOAD_POLL_S = 5.0

WECOM_REFRESH_ERRCODES = frozenset({40014, 42001})

TOKEN_APIS = ("stable", "client_credential", "wecom", "component")

DEFAULT_UPSTREAMS = {
    "stable": "https://api.weixin.qq.com",
    "client_credential": "https://api.weixin.qq.com",
    "wecom": "https://qyapi.weixin.qq.com",
    "component": "https://api.weixin.qq.com",
}

# A platform app (token_api: component) keeps at most this many authorizers'
# token managers in memory (DESIGN.md, Third-party platforms).
DEFAULT_MAX_CACHED_AUTHORIZERS = 10000

# An app name is also the first path segment that selects it, so it must not
# shadow a WeChat path root (`/cgi-bin/...` must never be read as an app).
RESERVED_APP_NAMES = frozenset({
    "cgi-bin", "sns", "wxa", "wxaapi", "datacube", "card", "merchant",
    "customservice", "shakearound", "bizwifi", "semantic", "tcb", "union",
    "product", "intracity", "express", "scan", "mall", "shop", "channels",
    "wxopen", "componenttcb", "cv", "marketing", "device", "poi", "media",
    "admin", "healthz", "readyz", "metrics",
    "sidecar",   # the sidecar's own root on the proxy port (DESIGN.md)
})

APP_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")

_VAR_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-(.*?))?\}")


class ConfigError(Exception):
    """A config problem, phrased for the operator: file, key, reason."""

    def __init__(self, file: str, key: str, reason: str):
        self.file, self.key, self.reason = file, key, reason
        where = f"{file}: {key}" if key else file
        super().__init__(f"{where}: {reason}")


class _Expanded(str):
    """A string produced by ${VAR} expansion; such strings may be read as numbers."""


@dataclass(frozen=True)
class Listen:
    host: str
    port: int
    allow_non_loopback: bool = False
    # Host names the proxy port answers besides loopback and `host` (a
    # node-wide sidecar reached by a name); anything else is a 403.
    allowed_hosts: tuple[str, ...] = ()


@dataclass(frozen=True)
class Admin:
    host: str
    port: int
    token: str = field(default="", repr=False)
    # Host names the admin port answers besides loopback names, IP literals
    # and `host` (an Ingress or Service name in front of it); anything else
    # is a 403 (DNS rebinding).
    allowed_hosts: tuple[str, ...] = ()


@dataclass(frozen=True)
class Upstream:
    base_url: str
    timeout_s: float
    # Egress (DESIGN.md, "Egress"): an HTTP CONNECT proxy for every
    # connection to WeChat, extra CAs for TLS to it, and WeChat's
    # disaster-recovery hosts for base_url. All take effect at start.
    proxy: str = field(default="", repr=False)       # http://[user:pass@]host:port; may carry a password
    ca_file: str = ""
    fallback: tuple[str, ...] = ()

    @property
    def safe_proxy(self) -> str:
        """The proxy URL for logs and `check`: any password masked."""
        return re.sub(r"//([^:@/]*):[^@/]*@", r"//\1:***@", self.proxy)


@dataclass(frozen=True)
class Sentinel:
    """Redis Sentinel: where the sentinels are and which master to follow."""
    hosts: tuple[tuple[str, int], ...]
    service: str
    username: str | None = None
    password: str | None = field(default=None, repr=False)        # the master's and replicas'
    sentinel_password: str | None = field(default=None, repr=False)  # the sentinels' own, if they have one
    db: int = 0
    tls: bool = False


@dataclass(frozen=True)
class Store:
    kind: str
    url: str = field(default="", repr=False)  # may carry a password
    key_prefix: str = "wts:"
    role: str = "fetcher"                     # fetcher | reader (never fetches)
    on_store_down: str = "fetch_locally"      # fetch_locally | fail
    daily_fetch_cap: int = 1000
    cluster: bool = False                     # url names a node of a Redis Cluster
    sentinel: Sentinel | None = None          # instead of url: the master Sentinel names

    @property
    def safe_url(self) -> str:
        """Where the store is, with any password masked, for summaries and logs."""
        if self.sentinel is not None:
            return (f"sentinel {self.sentinel.service} via "
                    + ",".join(f"{h}:{p}" for h, p in self.sentinel.hosts))
        return ("cluster " if self.cluster else "") + re.sub(r"(//[^:/@]*:)[^@/]*@", r"\1***@", self.url)


@dataclass(frozen=True)
class Log:
    level: str = "info"
    format: str = "json"
    access: bool = True      # one line per proxied call, at info


@dataclass(frozen=True)
class Callbacks:
    """The third listener: push intake only, the one meant to face the internet."""
    host: str
    port: int


# An app answers WeChat's push within this long, or WeChat hears `success`
# while delivery goes on (WeChat waits 5 s, then retries: push notes §5-6).
DEFAULT_REPLY_WITHIN_S = 4.0


@dataclass(frozen=True)
class Push:
    """Where an app's pushes are delivered, and the message token and
    EncodingAESKey they are checked and decrypted with."""
    deliver_to: str
    token: str = field(default="", repr=False)
    encoding_aes_key: str | None = field(default=None, repr=False)
    reply_within_s: float = DEFAULT_REPLY_WITHIN_S


@dataclass(frozen=True)
class App:
    name: str
    appid: str
    secret: str = field(repr=False)
    token_api: str
    refresh_before_s: float
    upstream: str
    min_refresh_interval_s: float
    inject_secret: bool = False
    refresh_errcodes: frozenset[int] | None = None   # None: the account kind's default
    secret_file: str | None = None                    # where the secret was read, if from a file
    agentid: str | None = None                        # WeCom: the application's agentid, for agent JSSDK config
    # Open Platform (token_api: component): the message token and
    # EncodingAESKey of the platform's pushes, and the authorizer cache's bound.
    msg_token: str | None = field(default=None, repr=False)
    encoding_aes_key: str | None = field(default=None, repr=False)
    max_cached_authorizers: int = DEFAULT_MAX_CACHED_AUTHORIZERS
    files: tuple[str, ...] = ()                       # every secret file read for this app
    # The paths it may use (DESIGN.md, "Least privilege"). Not compared: a
    # reload that changes only the list keeps the app's token manager.
    allow: AllowList = field(default_factory=AllowList, compare=False)
    push: Push | None = None                          # pushes to this app (the callbacks listener)

    @property
    def store_key(self) -> str:
        """Where this app's token lives: by appid, and for WeCom by agent secret too,
        because each WeCom application has its own token (wechat-api-notes.md §8)."""
        if self.token_api == "wecom":
            return f"wecom:{self.appid}:{hashlib.sha256(self.secret.encode()).hexdigest()[:16]}"
        return f"{self.token_api}:{self.appid}"


DEFAULT_PAY_UPSTREAM = "https://api.mch.weixin.qq.com"


@dataclass(frozen=True)
class Merchant:
    """A WeChat Pay merchant (DESIGN.md, "WeChat Pay (API v3)"): its keys live
    only here, read from files; none is ever logged, shown or counted."""
    name: str
    mchid: str
    serial_no: str                                   # the merchant API certificate's serial
    private_key_pem: bytes = field(repr=False)
    apiv3_key: bytes = field(repr=False)
    public_key_pem: bytes | None = field(default=None, repr=False)   # WeChat Pay public-key mode
    public_key_id: str | None = None                 # PUB_KEY_ID_...
    notify_to: str | None = None
    upstream: str = DEFAULT_PAY_UPSTREAM
    allow: AllowList = field(default_factory=AllowList, compare=False)
    files: tuple[str, ...] = ()


@dataclass(frozen=True)
class Config:
    source: str
    listen: Listen
    admin: Admin
    upstream: Upstream
    store: Store
    refresh_errcodes: frozenset[int]
    pass_token_errors: bool
    max_body_bytes: int
    apps: tuple[App, ...]
    shutdown_grace_s: float = DEFAULT_SHUTDOWN_GRACE_S
    log: Log = Log()
    callbacks: Callbacks | None = None                # absent: no callbacks listener
    client_timeout_s: float = DEFAULT_CLIENT_TIMEOUT_S
    no_token_paths: tuple[str, ...] = ()
    reload_poll_s: float = DEFAULT_RELOAD_POLL_S
    merchants: tuple[Merchant, ...] = ()

    def watched_files(self) -> tuple[str, ...]:
        """The files this config was made from: itself and the secret files."""
        return (self.source, *(path for app in self.apps for path in app.files),
                *(path for merchant in self.merchants for path in merchant.files))

    def merchant(self, name: str) -> Merchant | None:
        return next((m for m in self.merchants if m.name == name), None)

    def refresh_errcodes_for(self, app: App) -> frozenset[int]:
        """Errcodes that mean "this token is bad" for one app. WeCom differs:
        there 40001 means a bad secret; 40014 and 42001 mean a bad token
        (wechat-api-notes.md §8)."""
        if app.refresh_errcodes is not None:
            return app.refresh_errcodes
        return WECOM_REFRESH_ERRCODES if app.token_api == "wecom" else self.refresh_errcodes

    def app(self, name: str) -> App | None:
        for app in self.apps:
            if app.name == name:
                return app
        return None

    def summary(self) -> str:
        """A human summary for `check`: everything an operator wants to see, no secret."""
        lines = [
            f"config: {self.source}",
            f"listen: {self.listen.host}:{self.listen.port}",
            f"admin:  {self.admin.host}:{self.admin.port} "
            f"(admin token {'set' if self.admin.token else 'not set'})",
            f"upstream: {self.upstream.base_url} (timeout {self.upstream.timeout_s:g} s)"
            + (f", proxy {self.upstream.safe_proxy}" if self.upstream.proxy else "")
            + (f", ca_file {self.upstream.ca_file}" if self.upstream.ca_file else "")
            + (f", fallback {', '.join(self.upstream.fallback)}" if self.upstream.fallback else ""),
            f"store: {self.store.kind}" + (
                f" ({self.store.safe_url}, prefix {self.store.key_prefix!r}, role {self.store.role}, "
                f"on_store_down {self.store.on_store_down})" if self.store.kind == "redis" else "")
            + f", daily_fetch_cap {self.store.daily_fetch_cap}",
            f"refresh_errcodes: {sorted(self.refresh_errcodes)}",
            f"pass_token_errors: {str(self.pass_token_errors).lower()}",
            f"max_body_bytes: {self.max_body_bytes}",
            f"callbacks: {self.callbacks.host}:{self.callbacks.port}" if self.callbacks else "callbacks: off",
            *(f"merchant {m.name}: mchid={m.mchid} serial_no={m.serial_no} upstream={m.upstream} keys=<set>"
              + (f" public_key_id={m.public_key_id}" if m.public_key_id else " platform certificates")
              + f" allow={list(m.allow.patterns)}" + (f" notify_to={m.notify_to}" if m.notify_to else "")
              for m in self.merchants),
            f"apps ({len(self.apps)}; the first is the default route):",
        ]
        for app in self.apps:
            lines.append(
                f"  - {app.name}: appid={app.appid} token_api={app.token_api} "
                f"upstream={app.upstream} refresh_before_s={app.refresh_before_s:g} "
                "secret=<set>"
                + f" allow={list(app.allow.patterns)}"
                + (f" push=deliver_to {app.push.deliver_to} "
                   f"({'encrypted modes' if app.push.encoding_aes_key else 'plaintext mode only'})"
                   if app.push else "")
                + (f" pushes={'on (token, encoding_aes_key set)' if app.msg_token else 'off (admin only)'} "
                   f"max_cached_authorizers={app.max_cached_authorizers}" if app.token_api == "component" else "")
            )
        return "\n".join(lines)
