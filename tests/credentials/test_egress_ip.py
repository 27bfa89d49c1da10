"""errcode 40164 (the caller's IP is not whitelisted) on a token fetch: the
egress IP WeChat names is shown in /admin/apps, logged once per IP, and
exported for the alert rule (deploy/prometheus/rules.yaml)."""
from __future__ import annotations

import logging

import pytest

from proxy.credentials.policy import egress_ip

from ..conftest import past_coalescing
from ..ops.test_admin import metric, scrape


@pytest.mark.parametrize("errcode, message, ip", [
    (40164, "invalid ip 47.100.3.9 ipv6 ::ffff:47.100.3.9, not in whitelist rid: 6751a3f2-0b1c", "47.100.3.9"),
    (40164, "stable: invalid ip 2408:4000::1, not in whitelist", "2408:4000::1"),
    (60020, "not allow to access from your ip, hint: [1701], from ip: 198.51.100.20, more info at ...",
     "198.51.100.20"),
    (40164, "invalid ip, not in whitelist", None),
    (40125, "invalid appsecret 47.100.3.9", None),
])
def test_the_egress_ip_is_read_from_wechats_errmsg(errcode, message, ip):
    assert egress_ip(errcode, message) == ip


async def test_a_refused_egress_ip_is_shown_logged_once_and_exported(make_sidecar, sim, http, caplog):
    caplog.set_level(logging.WARNING)
    running = await make_sidecar()
    sim.settings.token_fault, sim.settings.egress_ip = "errcode:40164", "198.51.100.77"
    await past_coalescing()
    for _ in range(2):                                  # two refused fetches, one notice
        async with http.post(f"{running.admin}/admin/refresh?app=mp") as resp:
            assert resp.status == 503 and "198.51.100.77" in (await resp.json())["errmsg"]
        await past_coalescing()
    async with http.get(f"{running.admin}/admin/apps") as resp:
        app = (await resp.json())["apps"][0]
    assert app["egress_ip_not_whitelisted"] == "198.51.100.77" and app["usable"]   # the token is still served
    notices = [r for r in caplog.records if getattr(r, "event", None) == "egress_ip_not_whitelisted"]
    assert len(notices) == 1 and "198.51.100.77" in notices[0].getMessage()
    assert "whitelist" in notices[0].getMessage()
    text = await scrape(http, running)
    assert metric(text, "wts_egress_ip_not_whitelisted", app="mp", ip="198.51.100.77") == 1

    sim.settings.token_fault = ""                       # whitelisted: the next fetch clears it
    async with http.post(f"{running.admin}/admin/refresh?app=mp") as resp:
        assert resp.status == 200
    async with http.get(f"{running.admin}/admin/apps") as resp:
        assert "egress_ip_not_whitelisted" not in (await resp.json())["apps"][0]
    assert metric(await scrape(http, running), "wts_egress_ip_not_whitelisted", app="mp", ip="198.51.100.77") == 0
