"""Reading the YAML mapping key by key: ${VAR} expansion, the typed
converters each key goes through, and one ConfigError naming file, key and
reason for anything else."""
from __future__ import annotations

import re
from typing import Any, Callable

from ..http.allow import AllowList, BadPattern
from .files import MAX_CONFIG_BYTES, FileRefused, read_small_file
from .model import _VAR_RE, ConfigError, Sentinel, _Expanded

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
