"""One JSON object per line on stdout (or plain text), with the fields the
Kubernetes checklist names. Tokens and secrets are never passed to a logger;
as a last guard, any `access_token=`/`secret=` value that reaches a message
through a third-party library is masked."""
from __future__ import annotations

import asyncio
import json
import logging
import re
import sys
import time

# Extra fields a log call may carry (`extra={...}`); anything else is dropped.
FIELDS = ("event", "app", "request_id", "method", "path", "status", "errcode", "duration_s",
          "replayed", "reason", "failure", "ip")

_SECRET_RE = re.compile(r"((?:access_token|secret|corpsecret|appsecret)[\"']?\s*[=:]\s*[\"']?)[^&\s\"',}]+",
                        re.IGNORECASE)


def redact(text: str) -> str:
    return _SECRET_RE.sub(r"\1<redacted>", text)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
                  + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": redact(record.getMessage()),
        }
        for name in FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                entry[name] = value
        if record.exc_info:
            entry["error"] = redact(self.formatException(record.exc_info).splitlines()[-1])
        return json.dumps(entry, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        extras = " ".join(f"{n}={getattr(record, n)}" for n in FIELDS if getattr(record, n, None) is not None)
        line = f"{time.strftime('%H:%M:%S')} {record.levelname:<7} {record.getMessage()}"
        return redact(f"{line} {extras}".rstrip())


def setup(level: str = "info", fmt: str = "json") -> None:
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiohttp's own access log prints full URLs (queries carry tokens): off.
    logging.getLogger("aiohttp.access").disabled = True


class AccessLog:
    """The per-call access lines, off the logging module's slow path.

    One line per call through `logging` cost about a quarter of the proxy's
    CPU (record objects, handler locks, a write syscall per line). Lines are
    built here directly and written in batches: flushed every FLUSH_S or
    when BATCH_BYTES pile up, and at shutdown. Same fields, same format,
    same level switch (the `proxy.access` logger at INFO).
    """

    FLUSH_S = 0.1
    BATCH_BYTES = 64 * 1024
    KEPT_LINE_PARTS = 256

    def __init__(self, fmt: str = "json", stream=None, on: bool = True):  # type: ignore[no-untyped-def]
        self.fmt = fmt
        self.on = on
        self.stream = stream
        self.logger = logging.getLogger("proxy.access")
        self._lines: list[str] = []
        self._size = 0
        self._timer: object | None = None
        self._second = -1
        self._stamp = ""
        self._whats: dict[tuple[str | None, str | None, str, str, int], str] = {}

    @property
    def enabled(self) -> bool:
        return self.on and self.logger.isEnabledFor(logging.INFO)     # False too when the logger is disabled

    def _new_second(self, second: int) -> None:
        """The timestamp's text up to the second, made once a second."""
        self._second, self._stamp = second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))

    def _what(self, key: tuple[str | None, str | None, str, str, int]) -> str:
        """The fields of a JSON line fixed by app, method, path and status: made
        once for each such call and kept (a bounded number of them)."""
        app, appid, method, path, status = key
        quoted = _json_str(redact(path) if "=" in path else path)   # methods are tokens, status a number
        text = (f'"msg": "{method} {quoted[1:-1]} -> {status}", "event": "call", '
                f'{"" if app is None else f""""app": {_json_str(app)}, """}'
                f'"appid": {"null" if appid is None else _json_str(appid)}, '
                f'"method": "{method}", "path": {quoted}, "status": {status}, ')
        if len(self._whats) >= self.KEPT_LINE_PARTS:
            self._whats.clear()
        self._whats[key] = text
        return text

    def call(self, app: str | None, appid: str | None, request_id: str, method: str, path: str, status: int,
             errcode: int | None, replayed: bool, duration_s: float) -> None:
        """One line per call with the fields of the deployment checklist:
        ts, level, msg, appid, request_id, method, path (never the query),
        status, errcode, duration_s, replayed; null where there is none."""
        now = time.time()
        tenths = int(duration_s * 10000 + 0.5)          # the duration to 0.1 ms
        duration = _TENTHS_MS[tenths] if tenths < 1000 else f"{duration_s:.4f}"
        if self.fmt == "json":
            # A template: what a call's app, method, path and status fix is
            # made once (_what); only the request id goes through the (C)
            # JSON string escaper per call.
            key = (app, appid, method, path, status)
            what = self._whats.get(key) or self._what(key)
            second = int(now)
            if second != self._second:
                self._new_second(second)
            line = (f'{{"ts": "{self._stamp}{_MILLIS[int((now - second) * 1000)]}", "level": "info", '
                    f'"logger": "proxy.access", {what}'
                    f'"request_id": {_json_str(request_id)}, '
                    f'"errcode": {"null" if errcode is None else errcode}, '
                    f'"replayed": {"true" if replayed else "false"}, "duration_s": {duration}}}\n')
        else:
            if "=" in path:
                path = redact(path)
            extras = (f"app={app} appid={appid} request_id={request_id} method={method} path={path} "
                      f"status={status}")
            if errcode is not None:
                extras += f" errcode={errcode}"
            line = (f"{time.strftime('%H:%M:%S', time.localtime(now))} INFO    {method} {path} -> {status} "
                    f"event=call {extras} replayed={replayed} duration_s={duration}\n")
        self._lines.append(line)
        self._size += len(line)
        if self._size >= self.BATCH_BYTES:
            self.flush()
        elif self._timer is None:
            try:
                self._timer = asyncio.get_running_loop().call_later(self.FLUSH_S, self.flush)
            except RuntimeError:
                self.flush()

    def flush(self) -> None:
        self._timer = None
        if not self._lines:
            return
        data, self._lines, self._size = "".join(self._lines), [], 0
        stream = self.stream or sys.stdout
        try:
            stream.write(data)
            stream.flush()
        except (OSError, ValueError):
            pass  # stdout gone (shutting down): nothing better to do


# ".000Z" to ".999Z": the sub-second part of an access line's timestamp.
_MILLIS = tuple(f".{ms:03d}Z" for ms in range(1000))
# "0.0000" to "0.0999": durations under 0.1 s, to 0.1 ms (formatting a float costs more).
_TENTHS_MS = tuple(f"0.{n:04d}" for n in range(1000))

_json_str = json.encoder.encode_basestring  # type: ignore[attr-defined]

