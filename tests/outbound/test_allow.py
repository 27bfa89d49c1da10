"""Allow lists (DESIGN.md, "Least privilege"): an app may use only the paths
its list names, for forwarded calls and local answers alike; nothing is
forwarded or handed out otherwise."""
from __future__ import annotations

import subprocess
import sys

import pytest
from yarl import URL

from proxy import config as config_mod
from proxy.http.allow import AllowList

from ..conftest import ROOT, SECRET, sidecar_yaml
from ..credentials.test_platform import AUTHORIZERS, EVENT, PLATFORM, authorized, get_json, platform_yaml
from ..ops.test_admin import metric, scrape

OA_BACKEND = ["/cgi-bin/message/*", "/cgi-bin/user/info", "/cgi-bin/menu/get", "/sns/**"]


@pytest.mark.parametrize("patterns, path, allowed", [
    (["/**"], "/", True), (["/**"], "/cgi-bin/anything/at/all", True),
    ([], "/cgi-bin/token", False),
    (["/cgi-bin/message/*"], "/cgi-bin/message/custom/send", True),
    (["/cgi-bin/message/*"], "/cgi-bin/message/", True),
    (["/cgi-bin/message/*"], "/cgi-bin/message", False),           # /x/* is not /x itself
    (["/cgi-bin/message/**"], "/cgi-bin/message/mass/send", True),
    (["/cgi-bin/user/info"], "/cgi-bin/user/info", True),
    (["/cgi-bin/user/info"], "/cgi-bin/user/info/batchget", False),
    (["/cgi-bin/user/info"], "/cgi-bin/user/%69nfo", False),        # an escaped spelling is not the path
    (["/wxa/*/send"], "/wxa/subscribe/send", True),
    (["/wxa/*/send"], "/wxa/a/b/send", False),                    # * stays within a segment
    (["/cgi-bin/user/info*"], "/cgi-bin/user/info_batch", True),
    (["/cgi-bin/user/info"], "/cgi-bin/user/infoX", False),
    (["/a.b"], "/aXb", False),                                    # literal, not a regex
])
def test_allow_list_patterns(patterns, path, allowed):
    assert AllowList(patterns).allows(path) is allowed


@pytest.mark.parametrize("value, key, why", [
    ('["cgi-bin/token"]', "apps[0].allow[0]", "does not start with /"),
    ('"/cgi-bin/token"', "apps[0].allow", "must be a list"),
    ("[42]", "apps[0].allow[0]", "must be a path pattern string"),
    ('["/a/**/b"]', "apps[0].allow[0]", "** only at the end"),
    ('["/a?x=1"]', "apps[0].allow[0]", "not a path"),
])
def test_a_bad_allow_entry_is_a_config_error_naming_it(value, key, why):
    text = sidecar_yaml("http://127.0.0.1:9", app_extra=f"allow: {value}\n")
    with pytest.raises(config_mod.ConfigError) as err:
        config_mod.parse(text, "c.yaml", {})
    assert err.value.key == key and why in err.value.reason


def oa_yaml(url: str, allow: list[str] = OA_BACKEND) -> str:
    return sidecar_yaml(url, app_extra=f"allow: {allow!r}\n".replace("'", '"'))


async def test_a_path_outside_the_list_is_403_and_nothing_reaches_wechat(make_sidecar, sim, http):
    running = await make_sidecar(oa_yaml(sim.url))
    fetches, calls = sim.fetch_count(), sim.business_calls
    status, body = await get_json(http, f"{running.base}/cgi-bin/user/info?openid=O")
    assert status == 200 and body["errcode"] == 0
    status, body = await get_json(http, f"{running.base}/mp/cgi-bin/message/custom/send")
    assert status == 200
    assert sim.business_calls == calls + 2
    for path in ("/cgi-bin/menu/delete", "/cgi-bin/user/%69nfo?openid=O", "/cgi-bin/message",
                 "/mp/cgi-bin/menu/delete", "/cgi-bin/token?grant_type=client_credential",
                 "/cgi-bin/ticket/getticket?type=jsapi", "/sidecar/jssdk?url=https%3A%2F%2Fa.example%2F",
                 "/sidecar/nothing-here"):
        status, body = await get_json(http, URL(f"{running.base}{path}", encoded=True))   # sent as written
        assert status == 403, path
        shown = path.split("?")[0].removeprefix("/mp")
        assert body == {"errcode": -1, "errmsg": f"sidecar: {shown} is not in app mp's allow list"}, body
    async with http.post(f"{running.base}/cgi-bin/stable_token", json={"grant_type": "client_credential"}) as resp:
        assert resp.status == 403                     # the token never leaves the sidecar
    assert sim.business_calls == calls + 2 and sim.fetch_count() == fetches and sim.ticket_fetch_count() == 0
    assert metric(await scrape(http, running), "wts_calls_total", app="mp", outcome="denied") == 9


async def test_local_answers_are_served_when_listed(make_sidecar, sim, http):
    running = await make_sidecar(oa_yaml(sim.url, ["/cgi-bin/token", "/cgi-bin/ticket/getticket", "/sidecar/jssdk"]))
    status, body = await get_json(http, f"{running.base}/cgi-bin/token?grant_type=client_credential")
    assert status == 200 and body["access_token"]
    status, body = await get_json(http, f"{running.base}/cgi-bin/ticket/getticket?type=jsapi")
    assert status == 200 and body["ticket"]
    status, body = await get_json(http, f"{running.base}/sidecar/jssdk?url=https%3A%2F%2Fa.example%2F")
    assert status == 200 and body["signature"]
    status, _ = await get_json(http, f"{running.base}/cgi-bin/user/info")
    assert status == 403


async def test_an_empty_list_allows_nothing(make_sidecar, sim, http):
    running = await make_sidecar(oa_yaml(sim.url, []))
    for path in ("/cgi-bin/user/info", "/cgi-bin/token", "/sns/jscode2session"):
        assert (await get_json(http, f"{running.base}{path}"))[0] == 403


async def test_a_platforms_list_governs_its_authorizers_calls(make_sidecar, sim, http):
    yaml = platform_yaml(sim.url).replace("    min_refresh_interval_s: 0\n  - name: mp",
                                          '    min_refresh_interval_s: 0\n    allow: ["/cgi-bin/user/info"]\n  - name: mp')
    assert 'allow: ["/cgi-bin/user/info"]' in yaml
    running = await make_sidecar(yaml)
    sim.settings.push_url = running.base + EVENT
    assert await sim.push_verify_ticket(PLATFORM) == 200
    appid = AUTHORIZERS[3]
    await running.sidecar.platforms["plat"].register({appid: authorized(sim, appid)})
    assert (await get_json(http, f"{running.base}/plat/{appid}/cgi-bin/user/info?openid=O"))[0] == 200
    status, body = await get_json(http, f"{running.base}/plat/{appid}/cgi-bin/menu/delete")
    assert status == 403 and body["errmsg"].endswith("is not in app plat's allow list")
    status, _ = await get_json(http, f"{running.base}/cgi-bin/menu/delete", headers={"X-WeChat-Authorizer": appid})
    assert status == 403
    # a denied path is 403 before the authorizer is even looked up
    status, _ = await get_json(http, f"{running.base}/plat/{AUTHORIZERS[4]}/cgi-bin/menu/delete")
    assert status == 403
    status, _ = await get_json(http, f"{running.base}/plat/{AUTHORIZERS[4]}/cgi-bin/user/info")
    assert status == 404                               # allowed path, unknown authorizer


async def test_a_reload_changes_the_list_and_keeps_the_token(make_sidecar, sim, http):
    running = await make_sidecar(oa_yaml(sim.url))
    assert (await get_json(http, f"{running.base}/cgi-bin/menu/delete"))[0] == 403
    fetches = sim.fetch_count()
    running.sidecar.reload(config_mod.parse(oa_yaml(sim.url, [*OA_BACKEND, "/cgi-bin/menu/*"]), "c.yaml", {}))
    assert (await get_json(http, f"{running.base}/cgi-bin/menu/delete"))[0] == 200
    running.sidecar.reload(config_mod.parse(oa_yaml(sim.url, ["/cgi-bin/menu/*"]), "c.yaml", {}))
    assert (await get_json(http, f"{running.base}/cgi-bin/user/info"))[0] == 403
    assert sim.fetch_count() == fetches                 # the same app, the same token


def test_check_prints_each_apps_list(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(oa_yaml("http://127.0.0.1:9"))
    result = subprocess.run([sys.executable, "-m", "proxy", "check", "--config", str(path)], cwd=ROOT,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert f"allow={OA_BACKEND}" in result.stdout and SECRET not in result.stdout
