"""From a file or text to a Config: the top level, apps, pushes and
merchants, each checked as it is read."""
from __future__ import annotations

import ipaddress
import os
import re
from typing import Any

import yaml

from ..http.allow import AllowList
from ..wechat.crypto import aes_key
from .fields import (
    _allow_list,
    _bool,
    _ca_file,
    _check_redis_url,
    _choice,
    _errcodes,
    _expand,
    _host_list,
    _number,
    _proxy_url,
    _Section,
    _sentinel,
    _str,
    _type_name,
    _url,
    _url_list,
)
from .files import MAX_CONFIG_BYTES, MAX_SECRET_FILE_BYTES, FileRefused, _compose, read_small_file
from .model import (
    APP_NAME_RE,
    DEFAULT_CLIENT_TIMEOUT_S,
    DEFAULT_DAILY_FETCH_CAP,
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_MAX_CACHED_AUTHORIZERS,
    DEFAULT_MIN_REFRESH_INTERVAL_S,
    DEFAULT_PAY_UPSTREAM,
    DEFAULT_REFRESH_BEFORE_S,
    DEFAULT_RELOAD_POLL_S,
    DEFAULT_REPLY_WITHIN_S,
    DEFAULT_SHUTDOWN_GRACE_S,
    DEFAULT_UPSTREAMS,
    RESERVED_APP_NAMES,
    TOKEN_APIS,
    Admin,
    App,
    Callbacks,
    Config,
    ConfigError,
    Listen,
    Log,
    Merchant,
    Push,
    Store,
    Upstream,
)


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
    from ..wechat.pay import PayCryptoError, load_private_key, load_public_key
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
    data, path = _key_file(sec, file, f"{key}_file", files)  # type: ignore[misc]
    try:
        value = data.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise ConfigError(file, sec.path(f"{key}_file"), f"cannot read {path}: UnicodeDecodeError") from None
    if not value:
        raise ConfigError(file, sec.path(f"{key}_file"), f"{path} is empty")
    return value


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def resolve_path(cli_path: str | None) -> str:
    """--config, else $SIDECAR_CONFIG, else ./config.yaml (DESIGN.md)."""
    return cli_path or os.environ.get("SIDECAR_CONFIG") or "config.yaml"
