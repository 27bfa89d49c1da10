"""Load, expand and validate the sidecar's YAML config into frozen dataclasses.

Every problem becomes one ``ConfigError`` that names the file, the key and the
reason, so ``python -m proxy check`` can print it and exit 2.
"""
from __future__ import annotations

import hashlib
import ipaddress
import os
import re
import stat
from dataclasses import dataclass, field
from typing import Any, Callable

import yaml

from .http.allow import AllowList, BadPattern
from .wechat.crypto import aes_key

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


# ---------------------------------------------------------------- expansion

def _expand(value: Any, file: str, key: str, env: dict[str, str]) -> Any:
    """Expand ${VAR} / ${VAR:-default} inside string values, after YAML parsing,
    so a secret containing `#` or `: ` can never change the document's shape."""
    if isinstance(value, dict):
        return {k: _expand(v, file, f"{key}.{k}" if key else str(k), env) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand(v, file, f"{key}[{i}]", env) for i, v in enumerate(value)]
    if not isinstance(value, str) or "${" not in value:
        return value

    def substitute(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        if name in env:
            return env[name]
        if default is not None:
            return default
        raise ConfigError(file, key, f"environment variable {name} is not set (and no ${{{name}:-default}} given)")

    return _Expanded(_VAR_RE.sub(substitute, value))


# ---------------------------------------------------------------- validation helpers

class _Section:
    """One mapping of the config, read key by key; leftovers are unknown keys."""

    def __init__(self, data: Any, file: str, key: str):
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(file, key or "(top level)", f"must be a mapping, got {_type_name(data)}")
        self.data, self.file, self.key = dict(data), file, key

    def path(self, name: str) -> str:
        return f"{self.key}.{name}" if self.key else name

    def get(self, name: str, conv: Callable[[Any, str], Any], default: Any = ...) -> Any:
        if name not in self.data:
            if default is ...:
                raise ConfigError(self.file, self.path(name), "is required")
            return default
        return conv(self.data.pop(name), self.path(name))

    def section(self, name: str) -> "_Section":
        return _Section(self.data.pop(name, None), self.file, self.path(name))

    def done(self) -> None:
        for extra in self.data:
            raise ConfigError(self.file, self.path(str(extra)), "unknown key")


def _type_name(value: Any) -> str:
    return "nothing" if value is None else type(value).__name__


def _str(file: str, allow_empty: bool = False) -> Callable[[Any, str], str]:
    def conv(value: Any, key: str) -> str:
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise ConfigError(file, key, f"must be a string, got {_type_name(value)}")
        value = str(value)
        if not allow_empty and not value.strip():
            raise ConfigError(file, key, "must not be empty")
        return value
    return conv


def _number(file: str, kind: type, low: float, high: float) -> Callable[[Any, str], Any]:
    def conv(value: Any, key: str) -> Any:
        if isinstance(value, _Expanded):
            try:
                value = kind(value.strip())
            except ValueError:
                raise ConfigError(file, key, f"must be a {kind.__name__}, got {str(value)!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)):
            raise ConfigError(file, key, f"must be a{'n integer' if kind is int else ' number'}, got {_type_name(value)}")
        if not low <= value <= high:
            raise ConfigError(file, key, f"must be between {low:g} and {high:g}, got {value}")
        return kind(value)
    return conv


def _bool(file: str) -> Callable[[Any, str], bool]:
    def conv(value: Any, key: str) -> bool:
        if isinstance(value, _Expanded) and value.strip().lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.strip().lower() in ("true", "yes", "1")
        if not isinstance(value, bool):
            raise ConfigError(file, key, f"must be true or false, got {_type_name(value)}")
        return value
    return conv


def _errcodes(file: str) -> Callable[[Any, str], frozenset[int]]:
    def conv(value: Any, key: str) -> frozenset[int]:
        if not isinstance(value, list) or not value:
            raise ConfigError(file, key, f"must be a non-empty list of integers, got {_type_name(value)}")
        return frozenset(_number(file, int, -(2**31), 2**31)(v, f"{key}[{i}]") for i, v in enumerate(value))
    return conv


def _choice(file: str, options: tuple[str, ...]) -> Callable[[Any, str], str]:
    def conv(value: Any, key: str) -> str:
        text = _str(file)(value, key)
        if text not in options:
            raise ConfigError(file, key, f"must be one of {', '.join(options)}, got {text!r}")
        return text
    return conv


def _sentinel(sec: "_Section", file: str) -> Sentinel:
    def hosts(value: Any, key: str) -> tuple[tuple[str, int], ...]:
        if not isinstance(value, list) or not value:
            raise ConfigError(file, key, "must be a non-empty list of \"host:port\" sentinels")
        out = []
        for i, item in enumerate(value):
            host, colon, port = str(item).rpartition(":")
            if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ConfigError(file, f"{key}[{i}]", f"must be host:port, got {str(item)[:60]!r}")
            out.append((host.strip("[]"), int(port)))
        return tuple(out)

    sentinel = Sentinel(
        hosts=sec.get("hosts", hosts), service=sec.get("service", _str(file)),
        username=sec.get("username", _str(file), None), password=sec.get("password", _str(file, True), None),
        sentinel_password=sec.get("sentinel_password", _str(file, True), None),
        db=sec.get("db", _number(file, int, 0, 15), 0), tls=sec.get("tls", _bool(file), False))
    sec.done()
    return sentinel


def _check_redis_url(url: str, file: str, key: str) -> None:
    if not re.match(r"^(redis|rediss|unix)://", url):
        raise ConfigError(file, key, "must start with redis://, rediss:// or unix://")
    try:
        from redis.connection import parse_url
        parse_url(url)
    except (ValueError, TypeError) as exc:
        # The message names the part that is wrong, never the password.
        raise ConfigError(file, key, f"not a valid Redis URL: {str(exc).split(' as ')[0]}") from None


def _proxy_url(file: str) -> Callable[[Any, str], str]:
    """http://[user:pass@]host:port, or empty (no proxy: `${HTTPS_PROXY:-}`)."""
    def conv(value: Any, key: str) -> str:
        text = _str(file, allow_empty=True)(value, key).strip()
        if not text:
            return ""
        match = re.match(r"^http://(?:([^:@/\s]*)(?::([^@/\s]*))?@)?([^:@/\s]+|\[[0-9a-fA-F:.]+\]):(\d{1,5})/?$", text)
        if match is None or not 0 < int(match.group(4)) < 65536:
            shown = re.sub(r"//([^:@/]*):[^@/]*@", r"//\1:***@", text)
            raise ConfigError(file, key, f"must be http://[user:pass@]host:port (an HTTP CONNECT proxy), "
                                         f"got {shown!r}")
        return text
    return conv


def _ca_file(file: str) -> Callable[[Any, str], str]:
    """A PEM file of CA certificates, read and checked now (trusted besides the system's)."""
    def conv(value: Any, key: str) -> str:
        path = _str(file)(value, key)
        try:
            pem = read_small_file(path, MAX_CONFIG_BYTES).decode("ascii")
        except FileRefused as exc:
            raise ConfigError(file, key, f"{path} {exc}") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(file, key, f"cannot read {path}: {exc.__class__.__name__}") from None
        import ssl
        try:
            ssl.create_default_context().load_verify_locations(cadata=pem)
        except (ssl.SSLError, ValueError) as exc:
            raise ConfigError(file, key, f"{path} holds no valid PEM CA certificate ({exc.__class__.__name__})") \
                from None
        return path
    return conv


def _url_list(file: str) -> Callable[[Any, str], tuple[str, ...]]:
    def conv(value: Any, key: str) -> tuple[str, ...]:
        if not isinstance(value, list):
            raise ConfigError(file, key, f"must be a list of URLs, not {_type_name(value)}")
        return tuple(_url(file)(item, f"{key}[{i}]") for i, item in enumerate(value))
    return conv


def _allow_list(file: str) -> Callable[[Any, str], AllowList]:
    def conv(value: Any, key: str) -> AllowList:
        if not isinstance(value, list):
            raise ConfigError(file, key, f"must be a list of path patterns like \"/cgi-bin/message/*\", "
                                         f"not {_type_name(value)}")
        for index, entry in enumerate(value):
            if not isinstance(entry, str):
                raise ConfigError(file, f"{key}[{index}]", f"must be a path pattern string, not {_type_name(entry)}")
            try:
                AllowList([entry])
            except BadPattern as exc:
                raise ConfigError(file, f"{key}[{index}]", f"{exc}: an allow entry is a path pattern "
                                                            "starting with / (e.g. /cgi-bin/message/*)") from None
        return AllowList(value)
    return conv


def _host_list(file: str) -> Callable[[Any, str], tuple[str, ...]]:
    def conv(value: Any, key: str) -> tuple[str, ...]:
        if not isinstance(value, list):
            raise ConfigError(file, key, f"must be a list of host names, got {_type_name(value)}")
        hosts = []
        for i, item in enumerate(value):
            host = _str(file)(item, f"{key}[{i}]").strip().lower()
            if not re.match(r"^(\[[0-9a-f:.]+\]|[a-z0-9._-]+|[0-9a-f:]+)$", host):
                raise ConfigError(file, f"{key}[{i}]", f"must be a host name or address without port, got {item!r}")
            hosts.append(host)
        return tuple(hosts)
    return conv


def _url(file: str) -> Callable[[Any, str], str]:
    def conv(value: Any, key: str) -> str:
        text = _str(file)(value, key).rstrip("/")
        if not re.match(r"^https?://[^/\s?#]+(/[^\s?#]*)?$", text):
            raise ConfigError(file, key, f"must be an http:// or https:// URL without query, got {text!r}")
        return text
    return conv


# ---------------------------------------------------------------- loading

# A config file is a few KiB; a secret or key file well under one. Larger is
# a mistake (or /dev/zero behind a symlink), refused before it fills memory.
MAX_CONFIG_BYTES = 1024 * 1024
MAX_SECRET_FILE_BYTES = 64 * 1024


class FileRefused(Exception):
    """A file that is not a small regular file: why, safe to show."""


def read_small_file(path: str, limit: int) -> bytes:
    """A regular file's bytes, at most `limit`. Opened without blocking (a
    FIFO with no writer would hang open() and read() for ever), checked to be
    a regular file before a byte is read (a FIFO, device or directory is
    refused), and never read past the limit."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = ("a FIFO" if stat.S_ISFIFO(st.st_mode) else "a directory" if stat.S_ISDIR(st.st_mode)
                    else "a device" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)
                    else "a socket" if stat.S_ISSOCK(st.st_mode) else "not a regular file")
            raise FileRefused(f"is {kind}, not a regular file")
        if st.st_size > limit:
            raise FileRefused(f"is {st.st_size} bytes, over the {limit}-byte limit")
        chunks, size = [], 0
        while chunk := os.read(fd, limit + 1 - size):
            chunks.append(chunk)
            size += len(chunk)
            if size > limit:
                raise FileRefused(f"is over the {limit}-byte limit")
        return b"".join(chunks)
    finally:
        os.close(fd)


def load(path: str | os.PathLike[str], env: dict[str, str] | None = None) -> Config:
    file = str(path)
    env = dict(os.environ) if env is None else env
    try:
        text = read_small_file(file, MAX_CONFIG_BYTES).decode("utf-8")
    except FileNotFoundError:
        raise ConfigError(file, "", "file not found") from None
    except FileRefused as exc:
        raise ConfigError(file, "", str(exc)) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(file, "", f"cannot read: {exc}") from None
    return parse(text, file, env)


# YAML aliases may repeat a node; a document whose aliases expand to more
# than this many nodes (or this multiple of its own size) is a "billion
# laughs", not a config: refused before anything walks the expansion. Plain
# anchors and merges (`<<: *defaults`) in a real config stay far below it.
MAX_YAML_NODES = 10_000
MAX_YAML_EXPANSION = 10


def _compose(text: str) -> Any:
    """yaml.safe_load, with the alias expansion bounded (see MAX_YAML_NODES)."""
    node = yaml.compose(text, Loader=yaml.SafeLoader)
    if node is None:
        return None
    limit = max(MAX_YAML_NODES, MAX_YAML_EXPANSION * len(text))
    seen, stack = 0, [node]
    while stack:                          # every node as often as aliases repeat it
        current = stack.pop()
        seen += 1
        if seen > limit:
            raise ConfigError("", "", f"YAML aliases expand to more than {limit} nodes: refused "
                                      "(an alias bomb?)")
        if isinstance(current, yaml.SequenceNode):
            stack.extend(current.value)
        elif isinstance(current, yaml.MappingNode):
            for key, value in current.value:
                stack.extend((key, value))
    return _construct(node)


def _construct(node: Any) -> Any:
    loader = yaml.SafeLoader("")
    try:
        return loader.construct_document(node)
    finally:
        loader.dispose()


def parse(text: str, file: str = "<config>", env: dict[str, str] | None = None) -> Config:
    env = dict(os.environ) if env is None else env
    try:
        raw = _compose(text)
    except ConfigError as exc:
        raise ConfigError(file, "", exc.reason) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(file, "", f"not valid YAML: {where}{problem}") from None
    except (ValueError, TypeError, RecursionError) as exc:  # odd scalars, deep nesting
        raise ConfigError(file, "", f"not valid YAML: {exc}") from None
    if raw is None:
        raise ConfigError(file, "", "is empty")
    raw = _expand(raw, file, "", env)
    top = _Section(raw, file, "")

    listen_s = top.section("listen")
    listen = Listen(
        host=listen_s.get("host", _str(file), "127.0.0.1"),
        port=listen_s.get("port", _number(file, int, 0, 65535), 8080),
        allow_non_loopback=listen_s.get("allow_non_loopback", _bool(file), False),
        allowed_hosts=listen_s.get("allowed_hosts", _host_list(file), ()),
    )
    listen_s.done()
    if not is_loopback(listen.host) and not listen.allow_non_loopback:
        raise ConfigError(file, "listen.host", (
            f"{listen.host} is beyond loopback: whoever reaches it can call WeChat as this account "
            "and read the token from GET /cgi-bin/token. Keep 127.0.0.1 (a Pod's containers share it), "
            "or set listen.allow_non_loopback: true if that is really meant"))

    admin_s = top.section("admin")
    admin = Admin(
        host=admin_s.get("host", _str(file), "0.0.0.0"),
        port=admin_s.get("port", _number(file, int, 0, 65535), 9090),
        token=admin_s.get("token", _str(file, allow_empty=True), ""),
        allowed_hosts=admin_s.get("allowed_hosts", _host_list(file), ()),
    )
    admin_s.done()

    up_s = top.section("upstream")
    upstream = Upstream(
        base_url=up_s.get("base_url", _url(file), DEFAULT_UPSTREAMS["stable"]),
        timeout_s=up_s.get("timeout_s", _number(file, float, 0.1, 600), 15.0),
        proxy=up_s.get("proxy", _proxy_url(file), ""),
        ca_file=up_s.get("ca_file", _ca_file(file), ""),
        fallback=up_s.get("fallback", _url_list(file), ()),
    )
    up_s.done()

    store_s = top.section("store")
    kind = store_s.get("kind", _str(file), "memory")
    if kind not in ("memory", "redis"):
        raise ConfigError(file, "store.kind", f"must be memory or redis, got {kind!r}")
    cap = store_s.get("daily_fetch_cap", _number(file, int, 1, 10**7), DEFAULT_DAILY_FETCH_CAP)
    if kind == "redis":
        cluster = store_s.get("cluster", _bool(file), False)
        sentinel = _sentinel(store_s.section("sentinel"), file) if "sentinel" in store_s.data else None
        if sentinel is not None and ("url" in store_s.data or cluster):
            raise ConfigError(file, "store.sentinel", "give either sentinel or url (with cluster: true for a "
                                                      "Redis Cluster), not both")
        url = ""
        if sentinel is None:
            url = store_s.get("url", _str(file))
            _check_redis_url(url, file, "store.url")
            if cluster and url.startswith("unix://"):
                raise ConfigError(file, "store.url", "a Redis Cluster is reached over TCP: redis:// or rediss://")
        role = store_s.get("role", _choice(file, ("fetcher", "reader")), "fetcher")
        store = Store(
            kind=kind, url=url, key_prefix=store_s.get("key_prefix", _str(file), "wts:"), role=role,
            on_store_down=store_s.get("on_store_down", _choice(file, ("fetch_locally", "fail")), "fetch_locally"),
            daily_fetch_cap=cap, cluster=cluster, sentinel=sentinel)
    else:
        store = Store(kind=kind, daily_fetch_cap=cap)
    store_s.done()

    refresh_errcodes = top.get("refresh_errcodes", _errcodes(file), frozenset({40001, 40014, 42001}))
    pass_token_errors = top.get("pass_token_errors", _bool(file), False)
    max_body_bytes = top.get("max_body_bytes", _number(file, int, 1024, 1024**3), DEFAULT_MAX_BODY_BYTES)
    client_timeout_s = top.get("client_timeout_s", _number(file, float, 0.1, 3600), DEFAULT_CLIENT_TIMEOUT_S)
    shutdown_grace_s = top.get("shutdown_grace_s", _number(file, float, 0, 300), DEFAULT_SHUTDOWN_GRACE_S)
    reload_poll_s = top.get("reload_poll_s", _number(file, float, 0, 3600), DEFAULT_RELOAD_POLL_S)
    log_s = top.section("log")
    log = Log(level=log_s.get("level", _choice(file, ("debug", "info", "warning", "error")), "info"),
              format=log_s.get("format", _choice(file, ("json", "text")), "json"),
              access=log_s.get("access", _bool(file), True))
    log_s.done()

    def paths(value: Any, key: str) -> tuple[str, ...]:
        if not isinstance(value, list):
            raise ConfigError(file, key, f"must be a list of path prefixes, got {_type_name(value)}")
        out = tuple(_str(file)(v, f"{key}[{i}]") for i, v in enumerate(value))
        for i, prefix in enumerate(out):
            if not prefix.startswith("/"):
                raise ConfigError(file, f"{key}[{i}]", f"must start with '/', got {prefix!r}")
        return out

    no_token_paths = top.get("no_token_paths", paths, ())

    callbacks = None
    if "callbacks" in top.data:
        cb_s = top.section("callbacks")
        callbacks = Callbacks(host=cb_s.get("host", _str(file), "0.0.0.0"),
                              port=cb_s.get("port", _number(file, int, 0, 65535), 8081))
        cb_s.done()

    apps_raw = top.data.pop("apps", None)
    if not isinstance(apps_raw, list) or not apps_raw:
        raise ConfigError(file, "apps", "must be a non-empty list of apps")
    apps: list[App] = []
    for index, item in enumerate(apps_raw):
        apps.append(_parse_app(_Section(item, file, f"apps[{index}]"), file, upstream.base_url))
    merchants: list[Merchant] = []
    merchants_raw = top.data.pop("merchants", None)
    if merchants_raw is not None:
        if not isinstance(merchants_raw, list):
            raise ConfigError(file, "merchants", "must be a list of merchants")
        for index, item in enumerate(merchants_raw):
            merchants.append(_parse_merchant(_Section(item, file, f"merchants[{index}]"), file))
    seen: set[str] = set()
    for index, merchant in enumerate(merchants):
        if merchant.name in seen or any(app.name == merchant.name for app in apps):
            raise ConfigError(file, f"merchants[{index}].name", f"{merchant.name!r} is already an app or merchant name")
        seen.add(merchant.name)
    seen = set()
    for index, app in enumerate(apps):
        if app.name in seen:
            raise ConfigError(file, f"apps[{index}].name", f"duplicate app name {app.name!r}")
        seen.add(app.name)
        if app.push is not None and callbacks is None:
            raise ConfigError(file, f"apps[{index}].push", "pushes arrive on the callbacks listener: "
                                                           "add callbacks: {host: 0.0.0.0, port: 8081}")
    top.done()

    return Config(
        source=file, listen=listen, admin=admin, upstream=upstream, store=store,
        refresh_errcodes=refresh_errcodes, pass_token_errors=pass_token_errors,
        max_body_bytes=max_body_bytes, apps=tuple(apps), shutdown_grace_s=shutdown_grace_s, log=log,
        client_timeout_s=client_timeout_s, no_token_paths=no_token_paths, reload_poll_s=reload_poll_s,
        callbacks=callbacks, merchants=tuple(merchants),
    )


def _parse_app(sec: _Section, file: str, global_upstream: str) -> App:
    name = sec.get("name", _str(file))
    if not APP_NAME_RE.match(name):
        raise ConfigError(file, sec.path("name"), f"{name!r} must be letters, digits, '.', '_' or '-' (it is a URL path segment)")
    if name.lower() in RESERVED_APP_NAMES:
        raise ConfigError(file, sec.path("name"), f"{name!r} collides with a WeChat path root; pick another name")
    appid = sec.get("appid", _str(file))
    token_api = sec.get("token_api", _str(file), "stable")
    if token_api not in TOKEN_APIS:
        raise ConfigError(file, sec.path("token_api"), f"must be one of {', '.join(TOKEN_APIS)}, got {token_api!r}")

    files: list[str] = []
    secret = _secret_value(sec, file, "secret", files)
    if secret is None:
        raise ConfigError(file, sec.path("secret"), "give exactly one of secret or secret_file")
    secret_path = files[0] if files else None
    # The global upstream is WeChat's API host; WeCom apps default to their own.
    default_upstream = global_upstream
    if token_api == "wecom" and global_upstream == DEFAULT_UPSTREAMS["stable"]:
        default_upstream = DEFAULT_UPSTREAMS["wecom"]
    upstream = sec.get("upstream", _url(file), default_upstream)
    refresh_before_s = sec.get("refresh_before_s", _number(file, float, 0, 7000), DEFAULT_REFRESH_BEFORE_S)
    min_interval = sec.get("min_refresh_interval_s", _number(file, float, 0, 3600), DEFAULT_MIN_REFRESH_INTERVAL_S)
    inject_secret = sec.get("inject_secret", _bool(file), False)
    codes = sec.get("refresh_errcodes", _errcodes(file), None)
    agentid = sec.get("agentid", _str(file), None)
    if agentid is not None:
        if token_api != "wecom":
            raise ConfigError(file, sec.path("agentid"), "only WeCom apps (token_api: wecom) have an agentid")
        if not agentid.isdigit() or len(agentid) > 20:
            raise ConfigError(file, sec.path("agentid"), f"must be the application's number, got {agentid[:30]!r}")
    msg_token = _secret_value(sec, file, "token", files)
    aes = _secret_value(sec, file, "encoding_aes_key", files)
    has_max_cached = "max_cached_authorizers" in sec.data
    max_cached = sec.get("max_cached_authorizers", _number(file, int, 1, 10_000_000), DEFAULT_MAX_CACHED_AUTHORIZERS)
    allow = sec.get("allow", _allow_list(file), AllowList())
    for key, given in (("token", msg_token), ("encoding_aes_key", aes),
                       ("max_cached_authorizers", has_max_cached)):
        if given and token_api != "component":
            raise ConfigError(file, sec.path(key), "only platform apps (token_api: component) take this key")
    if (msg_token is None) != (aes is None):
        raise ConfigError(file, sec.path("encoding_aes_key" if aes is None else "token"),
                          "a platform's pushes need both token and encoding_aes_key (or neither, "
                          "if verify tickets and authorizers come through the admin port only)")
    if aes is not None:
        try:
            aes_key(aes)
        except ValueError as exc:
            raise ConfigError(file, sec.path("encoding_aes_key"),
                              f"the platform's EncodingAESKey {exc}") from None
    push = _parse_push(sec.section("push"), file, token_api, msg_token, aes, files) if "push" in sec.data else None
    sec.done()
    return App(
        name=name, appid=appid, secret=secret, token_api=token_api, push=push,
        refresh_before_s=refresh_before_s, upstream=upstream,
        min_refresh_interval_s=min_interval, inject_secret=inject_secret, refresh_errcodes=codes,
        secret_file=secret_path, agentid=agentid, msg_token=msg_token, encoding_aes_key=aes,
        max_cached_authorizers=max_cached, files=tuple(files), allow=allow,
    )


def _key_file(sec: _Section, file: str, key: str, files: list[str], required: bool = True) -> tuple[bytes, str] | None:
    """A key file's bytes and path: a small regular file (never logged)."""
    if key not in sec.data:
        if required:
            raise ConfigError(file, sec.path(key), "is required")
        return None
    path = sec.get(key, _str(file))
    try:
        data = read_small_file(path, MAX_SECRET_FILE_BYTES)
    except FileRefused as exc:
        raise ConfigError(file, sec.path(key), f"{path} {exc}") from None
    except OSError as exc:
        raise ConfigError(file, sec.path(key), f"cannot read {path}: {exc.__class__.__name__}") from None
    files.append(path)
    return data, path


def _parse_merchant(sec: _Section, file: str) -> Merchant:
    from .wechat.pay import PayCryptoError, load_private_key, load_public_key
    name = sec.get("name", _str(file))
    if not APP_NAME_RE.match(name) or name.lower() in RESERVED_APP_NAMES or name in ("v3", "pay"):
        raise ConfigError(file, sec.path("name"), f"{name!r} must be letters, digits, '.', '_' or '-' and not a "
                                                  "WeChat path root (it is a URL path segment)")
    mchid = sec.get("mchid", _str(file))
    if not mchid.isdigit():
        raise ConfigError(file, sec.path("mchid"), "must be the merchant number (digits)")
    serial_no = sec.get("serial_no", _str(file))
    if not re.fullmatch(r"[0-9A-Fa-f]{8,64}", serial_no):
        raise ConfigError(file, sec.path("serial_no"), "must be the merchant API certificate's serial (hex)")
    files: list[str] = []
    private, private_path = _key_file(sec, file, "private_key_file", files)  # type: ignore[misc]
    try:
        load_private_key(private)
    except PayCryptoError as exc:
        raise ConfigError(file, sec.path("private_key_file"), f"{private_path}: {exc}") from None
    apiv3, apiv3_path = _key_file(sec, file, "apiv3_key_file", files)  # type: ignore[misc]
    apiv3 = apiv3.strip()
    if len(apiv3) != 32:
        raise ConfigError(file, sec.path("apiv3_key_file"), f"{apiv3_path}: an APIv3 key is 32 bytes, "
                                                            f"this file holds {len(apiv3)}")
    public = _key_file(sec, file, "public_key_file", files, required=False)
    public_key_id = sec.get("public_key_id", _str(file), None)
    if (public is None) != (public_key_id is None):
        raise ConfigError(file, sec.path("public_key_id" if public_key_id is None else "public_key_file"),
                          "WeChat Pay public-key mode needs both public_key_file and public_key_id")
    if public is not None:
        try:
            load_public_key(public[0])
        except PayCryptoError as exc:
            raise ConfigError(file, sec.path("public_key_file"), f"{public[1]}: {exc}") from None
        if not public_key_id.startswith("PUB_KEY_ID_"):  # type: ignore[union-attr]
            raise ConfigError(file, sec.path("public_key_id"), "must start with PUB_KEY_ID_")
    merchant = Merchant(
        name=name, mchid=mchid, serial_no=serial_no.upper(), private_key_pem=private, apiv3_key=apiv3,
        public_key_pem=public[0] if public else None, public_key_id=public_key_id,
        notify_to=sec.get("notify_to", _url(file), None), upstream=sec.get("upstream", _url(file), DEFAULT_PAY_UPSTREAM),
        allow=sec.get("allow", _allow_list(file), AllowList()), files=tuple(files))
    sec.done()
    return merchant


def _parse_push(sec: _Section, file: str, token_api: str, platform_token: str | None, platform_aes: str | None,
                files: list[str]) -> Push:
    """push: {deliver_to, token, encoding_aes_key, reply_within_s}; a
    platform app's pushes use its own token and key."""
    deliver_to = sec.get("deliver_to", _url(file))
    reply_within_s = sec.get("reply_within_s", _number(file, float, 0.1, 4.9), DEFAULT_REPLY_WITHIN_S)
    if token_api == "component":
        for key in ("token", "encoding_aes_key", "token_file", "encoding_aes_key_file"):
            if key in sec.data:
                raise ConfigError(file, sec.path(key), "a platform app's pushes use its own token and "
                                                       "encoding_aes_key (keys of the app, not of push)")
        if platform_token is None or platform_aes is None:
            raise ConfigError(file, sec.path("deliver_to"), "a platform app's pushes need the app's token and "
                                                            "encoding_aes_key")
        sec.done()
        return Push(deliver_to=deliver_to, token=platform_token, encoding_aes_key=platform_aes,
                    reply_within_s=reply_within_s)
    token = _secret_value(sec, file, "token", files)
    if not token:
        raise ConfigError(file, sec.path("token"), "is required: the message token configured with WeChat "
                                                   "(or token_file)")
    aes = _secret_value(sec, file, "encoding_aes_key", files)
    if aes is not None:
        try:
            aes_key(aes)
        except ValueError as exc:
            raise ConfigError(file, sec.path("encoding_aes_key"), f"the EncodingAESKey {exc}") from None
    elif token_api == "wecom":
        raise ConfigError(file, sec.path("encoding_aes_key"), "WeCom pushes are always encrypted: it is required")
    sec.done()
    return Push(deliver_to=deliver_to, token=token, encoding_aes_key=aes, reply_within_s=reply_within_s)


def _secret_value(sec: _Section, file: str, key: str, files: list[str]) -> str | None:
    """A secret given inline (`key`) or read from a file (`key_file`), or
    None when neither is given; both given is an error. A file read is
    added to `files` (they are watched for changes)."""
    has_value, has_file = key in sec.data, f"{key}_file" in sec.data
    if has_value and has_file:
        raise ConfigError(file, sec.path(key), f"give exactly one of {key} or {key}_file")
    if has_value:
        return sec.get(key, _str(file))
    if not has_file:
        return None
    path = sec.get(f"{key}_file", _str(file))
    try:
        value = read_small_file(path, MAX_SECRET_FILE_BYTES).decode("utf-8").strip()
    except FileRefused as exc:
        raise ConfigError(file, sec.path(f"{key}_file"), f"{path} {exc}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(file, sec.path(f"{key}_file"), f"cannot read {path}: {exc.__class__.__name__}") from None
    if not value:
        raise ConfigError(file, sec.path(f"{key}_file"), f"{path} is empty")
    files.append(path)
    return value


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def resolve_path(cli_path: str | None) -> str:
    """--config, else $SIDECAR_CONFIG, else ./config.yaml (DESIGN.md)."""
    return cli_path or os.environ.get("SIDECAR_CONFIG") or "config.yaml"
