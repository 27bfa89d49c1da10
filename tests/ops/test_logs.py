"""The access line (proxy/ops/logs.py) on its own: its fields, the duration to
0.1 ms, redaction, and the bounded parts it keeps between calls."""
from __future__ import annotations

import io
import json

import pytest

from proxy.ops.logs import AccessLog


def lines_of(log: AccessLog, stream: io.StringIO) -> list[dict]:
    log.flush()
    return [json.loads(line) for line in stream.getvalue().splitlines()]


@pytest.mark.parametrize("seconds", [0.0, 0.00004, 0.00005, 0.00041234, 0.0123, 0.09994, 0.09996, 0.1, 1.23456, 75.5])
def test_the_duration_is_the_call_s_to_a_tenth_of_a_millisecond(seconds):
    stream = io.StringIO()
    log = AccessLog("json", stream=stream)
    log.call("mp", "wx1", "r1", "GET", "/cgi-bin/user/info", 200, 0, False, seconds)
    (line,) = lines_of(log, stream)
    assert abs(line["duration_s"] - seconds) <= 0.00005 + 1e-12
    assert line["duration_s"] == round(line["duration_s"], 4)


def test_every_field_is_right_when_the_kept_parts_are_reused_or_dropped():
    stream = io.StringIO()
    log = AccessLog("json", stream=stream)
    calls = [("mp", "wx1", f"r{i}", "POST" if i % 2 else "GET", f"/cgi-bin/p{i % 300}", 200 + i % 3,
              None if i % 5 == 0 else i, i % 7 == 0) for i in range(1000)]
    for app, appid, rid, method, path, status, errcode, replayed in calls:
        log.call(app, appid, rid, method, path, status, errcode, replayed, 0.001)
    assert len(log._whats) <= AccessLog.KEPT_LINE_PARTS          # bounded, whatever the paths
    got = lines_of(log, stream)
    assert len(got) == 1000
    for line, (app, appid, rid, method, path, status, errcode, replayed) in zip(got, calls, strict=True):
        assert (line["app"], line["appid"], line["request_id"], line["method"], line["path"], line["status"],
                line["errcode"], line["replayed"]) == (app, appid, rid, method, path, status, errcode, replayed)
        assert line["msg"] == f"{method} {path} -> {status}" and line["event"] == "call"


def test_a_new_appid_for_an_app_shows_at_once_and_paths_with_secrets_are_redacted():
    stream = io.StringIO()
    log = AccessLog("json", stream=stream)
    log.call("mp", "wxOLD", "r1", "GET", "/x", 200, 0, False, 0.001)
    log.call("mp", "wxNEW", "r2", "GET", "/x", 200, 0, False, 0.001)     # a reload changed the appid
    log.call(None, None, "r3", "GET", "/y;access_token=LEAKED", 400, None, False, 0.001)
    first, second, third = lines_of(log, stream)
    assert first["appid"] == "wxOLD" and second["appid"] == "wxNEW"
    assert "app" not in third and third["appid"] is None
    assert "LEAKED" not in stream.getvalue() and third["path"] == "/y;access_token=<redacted>"


def test_text_lines_carry_the_same_fields():
    stream = io.StringIO()
    log = AccessLog("text", stream=stream)
    log.call("mp", "wx1", "r1", "GET", "/cgi-bin/user/info", 200, 40001, True, 0.0123)
    log.flush()
    text = stream.getvalue()
    for part in ("GET /cgi-bin/user/info -> 200", "app=mp", "appid=wx1", "request_id=r1", "errcode=40001",
                 "replayed=True", "duration_s=0.0123"):
        assert part in text
