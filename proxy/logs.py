"""One JSON object per line on stdout (or plain text), with the fields the
Kubernetes checklist names. Tokens and secrets are never passed to a logger;
as a last guard, any `access_token=`/`secret=` value that reaches a message
through a third-party library is masked."""
from __future__ import annotations

import json
import logging
import re
import sys
import time

# Extra fields a log call may carry (`extra={...}`); anything else is dropped.
FIELDS = ("event", "app", "request_id", "method", "path", "status", "errcode", "duration_s",
          "replayed", "reason", "failure")

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
