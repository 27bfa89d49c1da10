"""Who may use the admin port (DESIGN.md, "Admin port"): what a web page could
make a browser send is refused (DNS rebinding, cross-site POSTs, text/plain
bodies that need no preflight), and without admin.token the /admin/ data is
for loopback callers only. Probes and /metrics stay open."""
from __future__ import annotations

import socket

import pytest

from ..conftest import sidecar_yaml
from ..credentials.test_platform import PLATFORM, platform_yaml


def own_non_loopback_address() -> str | None:
    """An address of this host that is not loopback (the source address of
    a connection to it is not loopback either), or None."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))          # TEST-NET-1: nothing is sent, a route is chosen
            address = probe.getsockname()[0]
        except OSError:
            return None
    return None if address.startswith("127.") or address == "0.0.0.0" else address


async def test_a_foreign_host_name_is_refused_and_nothing_changes(make_sidecar, sim, http):
    running = await make_sidecar(platform_yaml(sim.url))
    port = running.admin_port
    await running.sidecar.platforms["plat"].register({"wx00000000000000a1": "refresh@@@1"})
    for method, path in (("GET", "/admin/authorizers?app=plat"), ("GET", "/admin/apps"),
                         ("DELETE", "/admin/authorizers?app=plat&authorizer_appid=wx00000000000000a1"),
                         ("POST", "/admin/refresh?app=mp")):
        async with http.request(method, f"{running.admin}{path}", headers={"Host": f"attacker.example:{port}"}) as resp:
            assert resp.status == 403, (method, path)
            assert "attacker.example" in (await resp.json())["errmsg"]
    assert await running.sidecar.store.registry_get(PLATFORM, "wx00000000000000a1") == "refresh@@@1"
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"10.1.2.3:{port}", f"[::1]:{port}", "[fd00::5]"):
        async with http.get(f"{running.admin}/admin/authorizers?app=plat", headers={"Host": host}) as resp:
            assert resp.status == 200, host
    for path in ("/healthz", "/readyz", "/metrics"):              # probes and scrapers name what they like
        async with http.get(f"{running.admin}{path}", headers={"Host": f"my-pod.ns.svc:{port}"}) as resp:
            assert resp.status == 200, path


async def test_admin_allowed_hosts_names_the_hosts_it_answers(make_sidecar, sim, http):
    yaml = sidecar_yaml(sim.url).replace("admin:  {host: 127.0.0.1, port: 0}",
                                         "admin:  {host: 127.0.0.1, port: 0, allowed_hosts: [sidecar-admin.internal]}")
    running = await make_sidecar(yaml)
    async with http.get(f"{running.admin}/admin/apps", headers={"Host": "sidecar-admin.internal:9090"}) as resp:
        assert resp.status == 200
    async with http.get(f"{running.admin}/admin/apps", headers={"Host": "other.internal:9090"}) as resp:
        assert resp.status == 403


@pytest.mark.parametrize("headers", [
    {"Origin": "https://evil.example"}, {"Origin": "null"}, {"Sec-Fetch-Site": "cross-site"},
    {"Origin": "http://attacker.example:9090"},
])
async def test_a_cross_site_request_is_refused(make_sidecar, sim, http, headers):
    running = await make_sidecar(platform_yaml(sim.url))
    fetches = sim.fetch_count()
    async with http.post(f"{running.admin}/admin/refresh?app=mp", headers=headers) as resp:
        assert resp.status == 403
    async with http.post(f"{running.admin}/admin/authorizers?app=plat", headers=headers,
                         json={"authorizer_appid": "wx00000000000000a2", "authorizer_refresh_token": "r"}) as resp:
        assert resp.status == 403
    assert sim.fetch_count() == fetches
    assert await running.sidecar.store.registry_get(PLATFORM, "wx00000000000000a2") is None
    # The same page's own origin (the status page) is fine.
    async with http.post(f"{running.admin}/admin/refresh?app=mp",
                         headers={"Origin": running.admin, "Sec-Fetch-Site": "same-origin"}) as resp:
        assert resp.status == 200


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", None])
async def test_a_json_endpoint_takes_only_a_json_body(make_sidecar, sim, http, content_type):
    running = await make_sidecar(platform_yaml(sim.url))
    headers = {"Content-Type": content_type} if content_type else {}
    body = b'{"authorizer_appid": "wx00000000000000a3", "authorizer_refresh_token": "refresh@@@3"}'
    async with http.post(f"{running.admin}/admin/authorizers?app=plat", data=body, headers=headers,
                         skip_auto_headers=["Content-Type"]) as resp:
        assert resp.status == 415
    async with http.post(f"{running.admin}/admin/component/verify_ticket?app=plat",
                         data=b'{"component_verify_ticket": "ticket@@@x"}', headers=headers,
                         skip_auto_headers=["Content-Type"]) as resp:
        assert resp.status == 415
    assert await running.sidecar.store.registry_get(PLATFORM, "wx00000000000000a3") is None
    assert await running.sidecar.store.get_value(f"verify_ticket:{PLATFORM}") is None
    async with http.post(f"{running.admin}/admin/authorizers?app=plat", data=body,
                         headers={"Content-Type": "application/json; charset=utf-8"}) as resp:
        assert resp.status == 200


async def test_a_deeply_nested_admin_body_is_a_400_not_a_500(make_sidecar, sim, http):
    running = await make_sidecar(platform_yaml(sim.url))
    async with http.post(f"{running.admin}/admin/authorizers?app=plat", data=b"[" * 100_000,
                         headers={"Content-Type": "application/json"}) as resp:
        assert resp.status == 400


async def test_without_a_token_admin_data_is_for_loopback_callers_only(make_sidecar, sim, http):
    address = own_non_loopback_address()
    if address is None:
        pytest.skip("this host has no non-loopback address to call from")
    yaml = platform_yaml(sim.url).replace("admin:  {host: 127.0.0.1, port: 0}", "admin:  {host: 0.0.0.0, port: 0}")
    running = await make_sidecar(yaml)
    remote = f"http://{address}:{running.admin_port}"
    for path in ("/admin/apps", "/admin/authorizers?app=plat"):
        async with http.get(remote + path) as resp:
            assert resp.status == 403, path
            assert "admin.token" in (await resp.json())["errmsg"]
        async with http.get(running.admin + path) as resp:        # from loopback: served
            assert resp.status == 200, path
    for path in ("/healthz", "/readyz", "/metrics"):
        async with http.get(remote + path) as resp:
            assert resp.status == 200, path
