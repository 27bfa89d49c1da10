"""Property-based tests (hypothesis): whatever path and query an app sends,
what goes out reaches the configured upstream with exactly one access_token
and every other parameter kept; whatever YAML a config holds, loading gives
a Config or a ConfigError and nothing else."""
from __future__ import annotations

import asyncio
import http.client
import json
import threading
from urllib.parse import unquote

import pytest
import yaml
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy import config as config_mod
from proxy.server import start_sidecar
from proxy.simulator import SimSettings, WeChatSimulator

from ..conftest import APPID, SECRET, sidecar_yaml


class Background:
    """The simulator and a sidecar on an event loop in a thread, so a plain
    blocking client can drive them from hypothesis examples."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.sim = WeChatSimulator(accounts={APPID: SECRET}, settings=SimSettings())
        self.sim_runner, self.running = self.run(self._start())

    def run(self, coro):  # type: ignore[no-untyped-def]
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    async def _start(self):  # type: ignore[no-untyped-def]
        runner = web.AppRunner(self.sim.app(), access_log=None, shutdown_timeout=1)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        self.sim.url = f"http://127.0.0.1:{runner.addresses[0][1]}"  # type: ignore[attr-defined]
        cfg = config_mod.parse(sidecar_yaml(self.sim.url), "<prop>", env={})  # type: ignore[attr-defined]
        running = await start_sidecar(cfg)
        assert await running.sidecar.wait_ready(5)
        return runner, running

    def token(self) -> str:
        return self.running.sidecar.managers["mp"].current().value

    def stop(self) -> None:
        self.run(self.running.stop())
        self.run(self.sim_runner.cleanup())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture(scope="module")
def bg():
    background = Background()
    yield background
    background.stop()


# Characters an HTTP request target may carry without encoding (RFC 3986
# pchar and query), plus percent-escapes that matter here.
_PCHARS = st.sampled_from(list("abcAB0129-._~!$'()*+,;=:@") + ["%2e", "%2E", "%20", "%2F", "%25", "%E4%BD%A0"])
_SEGMENT = st.one_of(st.lists(_PCHARS, min_size=1, max_size=6).map("".join),
                     st.sampled_from(["..", ".", "", "cgi-bin", "mp", "sns", "%2e%2e"]))
_PATH = st.lists(_SEGMENT, min_size=1, max_size=5).map(lambda segs: "/" + "/".join(segs))
_KEY = st.one_of(st.sampled_from(["access_token", "access%5Ftoken", "openid", "a", "lang", "x"]),
                 st.lists(st.sampled_from(list("abcxyz_-.")), min_size=1, max_size=5).map("".join))
_VALUE = st.lists(_PCHARS.filter(lambda c: c not in ("=",)), max_size=6).map("".join)
_PARAM = st.one_of(st.tuples(_KEY, _VALUE).map(lambda kv: f"{kv[0]}={kv[1]}"), _KEY)
_QUERY = st.lists(_PARAM, max_size=6).map("&".join)


OUTCOMES: dict[int, int] = {}


def _is_token_param(part: str) -> bool:
    return unquote(part.split("=", 1)[0]) == "access_token"


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(path=_PATH, query=_QUERY, method=st.sampled_from(["GET", "POST"]))
def test_any_path_and_query_reach_the_upstream_with_exactly_one_token(bg, path, query, method):
    target = f"{path}?{query}" if query else path
    calls_before = bg.sim.business_calls
    conn = http.client.HTTPConnection("127.0.0.1", bg.running.proxy_port, timeout=10)
    conn.request(method, target, body=b"{}" if method == "POST" else None)
    resp = conn.getresponse()
    body = json.loads(resp.read())
    conn.close()
    OUTCOMES[resp.status] = OUTCOMES.get(resp.status, 0) + 1
    if resp.status == 400:
        assert body["errcode"] == -1 and body["errmsg"].startswith("sidecar: ")
        assert bg.sim.business_calls == calls_before          # nothing went out
        return
    assert resp.status == 200, (target, body)
    if body.get("path", "").startswith("/sns/"):
        return                                                # user-token calls keep theirs
    call = bg.sim.calls[-1]
    assert bg.sim.business_calls == calls_before + 1          # it reached the configured upstream
    assert call["access_token"] == [bg.token()]               # exactly one, the managed one
    sent = [p for p in call["query"].split("&") if p and not _is_token_param(p)]
    given_params = [p for p in query.split("&") if p and not _is_token_param(p)]
    assert sent == given_params


def test_the_property_run_forwarded_calls_and_refused_some():
    """Guards the test above: it must have exercised both branches."""
    if not OUTCOMES:
        pytest.skip("run together with the property test")
    print(OUTCOMES)
    assert OUTCOMES.get(200, 0) > 30 and OUTCOMES.get(400, 0) > 5, OUTCOMES


_YAML_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True),
                          st.text(max_size=12), st.sampled_from(["${X}", "${MISSING}", "${X:-7}", "memory",
                                                                  "redis", "stable", "wecom", "127.0.0.1"]))
_KEYS = st.sampled_from(["listen", "admin", "upstream", "store", "apps", "host", "port", "name", "appid",
                         "secret", "secret_file", "token_api", "kind", "url", "refresh_errcodes", "log",
                         "pass_token_errors", "timeout_s", "base_url", "level", "format", "zzz"])
_YAML = st.recursive(_YAML_SCALARS, lambda children: st.one_of(
    st.lists(children, max_size=4), st.dictionaries(_KEYS, children, max_size=5)), max_leaves=25)


@settings(max_examples=300, deadline=None)
@given(doc=_YAML)
def test_any_yaml_document_gives_a_config_or_a_config_error(doc):
    text = yaml.safe_dump(doc)
    try:
        cfg = config_mod.parse(text, "fuzz.yaml", {"X": "8"})
    except config_mod.ConfigError as exc:
        assert exc.file == "fuzz.yaml" and exc.reason
    else:
        assert cfg.apps


@settings(max_examples=300, deadline=None)
@given(text=st.text(max_size=200))
def test_any_text_gives_a_config_or_a_config_error(text):
    try:
        config_mod.parse(text, "fuzz.yaml", {})
    except config_mod.ConfigError:
        pass


class _Sniffed:
    """What Forwarder._errcode reads of an upstream answer."""
    content_encoding = b""
    content_type = b"application/json; charset=utf-8"


@given(code=st.integers(min_value=-10**9, max_value=10**10 - 1),
       before=st.sampled_from(["", " ", "  ", "\t", " \n "]), after=st.sampled_from(["", " ", "\r\n  "]),
       lead=st.text(alphabet="ab ", max_size=20), rest=st.sampled_from(["}", ',"errmsg":"ok"}', " }", ',"x":1}']))
@settings(max_examples=300, deadline=None)
def test_the_errcode_sniffed_is_the_one_json_reads(code, before, after, lead, rest):
    """Whatever the spacing, length or place of the number (cut by the
    looked-up window or not, at the end of the answer or not), the sniffer
    reads the errcode a JSON parser reads."""
    from proxy.outbound.forward import Forwarder
    body = f'{{"lead":"{lead}","errcode"{before}:{after}{code}{rest}'.encode()
    assert json.loads(body)["errcode"] == code
    # errmsg is read only for a token errcode (the one that is replayed)
    errmsg = json.loads(body).get("errmsg", "") if code == 40001 else ""
    assert Forwarder._errcode(_Sniffed(), body, frozenset({40001})) == (code, errmsg)
    # a token errcode is read whole, errmsg included
    token_error = f'{{"errcode"{before}:{after}40001,"errmsg":"invalid credential"}}'.encode()
    assert Forwarder._errcode(_Sniffed(), token_error, frozenset({40001})) == (40001, "invalid credential")
