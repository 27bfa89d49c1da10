"""The sidecar as a user runs it: `python -m proxy run|demo` in subprocesses,
real signals, real memory readings, and logs read for leaks."""
from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import aiohttp
import pytest

from proxy.simulator import media_bytes

from .conftest import APPID, ROOT, SECRET, free_port, sidecar_yaml, wait_ready, wait_until

MIB = 1024 * 1024


async def test_no_token_or_secret_in_any_log_line_at_debug_level(sim, spawn, http):
    port, admin = free_port(), free_port()
    text = sidecar_yaml(sim.url, listen_port=port, admin_port=admin, token_api="client_credential")
    text += textwrap_app_with_bad_secret()
    proc = spawn(text, env={"SIDECAR_LOG_LEVEL": "debug"})
    await wait_alive(proc, admin)
    base = f"http://127.0.0.1:{port}"
    # normal calls, an app-sent token, a replay, a local token answer, a /sns/ call with a user token
    async with http.get(f"{base}/cgi-bin/user/info?access_token=APP_SENT_TOKEN_123&openid=o",
                        headers={"X-Request-Id": "trace-7f3a"}) as r:
        assert r.status == 200
    sim.rotate(APPID, "client_credential", grace_s=0)
    async with http.post(f"{base}/cgi-bin/message/custom/send", data=b"{}") as r:
        assert r.status == 200
    async with http.get(f"{base}/cgi-bin/token?grant_type=client_credential&appid={APPID}&secret={SECRET}") as r:
        assert r.status == 200
    async with http.get(f"{base}/sns/userinfo?access_token=USER_OAUTH_SECRET_TOKEN&openid=o") as r:
        assert r.status == 200
    async with http.get(f"{base}/bad/cgi-bin/user/info") as r:
        assert r.status == 503
    assert proc.stop() == 0
    out = proc.output()
    lines = out.splitlines()
    assert len(lines) >= 6
    records = [json.loads(line) for line in lines]        # one JSON object per line
    calls = [r for r in records if r.get("event") == "call"]
    assert len(calls) == 5
    checklist = {"ts", "level", "msg", "appid", "request_id", "method", "path",
                 "status", "errcode", "duration_s", "replayed"}     # k8s-sidecar-checklist.md, Logs
    for call in calls:
        assert checklist <= call.keys(), checklist - call.keys()
        assert "?" not in call["path"] and "?" not in call["msg"]
    assert [c["appid"] for c in calls] == [APPID] * 4 + ["wx00000000000000b2"]
    assert calls[0]["errcode"] == 0 and calls[-1]["errcode"] is None and calls[-1]["status"] == 503
    # The app's X-Request-Id is kept; calls without one get ids of their own, all different.
    ids = [c["request_id"] for c in calls]
    assert ids[0] == "trace-7f3a" and len(set(ids)) == 5 and all(ids)
    assert all(isinstance(c["duration_s"], float) and 0 <= c["duration_s"] < 10 for c in calls)
    assert "token fetched" in out and "token rejected" in out and "40125" in out
    for secret in [SECRET, "WRONG-SECRET-zzzzzzzz", *sim.issued_tokens()]:
        assert secret not in out
    assert "APP_SENT_TOKEN_123" not in out and "USER_OAUTH_SECRET_TOKEN" not in out


def textwrap_app_with_bad_secret() -> str:
    return ("  - name: bad\n    appid: wx00000000000000b2\n    secret: WRONG-SECRET-zzzzzzzz\n"
            "    token_api: stable\n")


async def wait_alive(proc, admin_port: int, timeout: float = 10) -> None:
    """Ready enough: the default app has its token (another app may be failing)."""
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as s:
        while time.monotonic() < deadline:
            assert proc.proc.poll() is None, proc.output()
            try:
                async with s.get(f"http://127.0.0.1:{admin_port}/admin/apps") as r:
                    apps = (await r.json())["apps"]
                    if apps[0]["usable"]:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.05)
    raise AssertionError(proc.output())


async def test_20_mib_download_streams_with_identical_bytes_and_bounded_memory(sim, spawn):
    port, admin = free_port(), free_port()
    proc = spawn(sidecar_yaml(sim.url, listen_port=port, admin_port=admin))
    await proc.wait_ready(f"http://127.0.0.1:{admin}")
    url = f"http://127.0.0.1:{port}/cgi-bin/media/get?media_id=BIG&size={20 * MIB}"
    expected = hashlib.sha256()
    for chunk in media_bytes("BIG", 20 * MIB):
        expected.update(chunk)
    async with aiohttp.ClientSession() as s:
        # warm up the code paths once so the baseline includes them
        async with s.get(url.replace(str(20 * MIB), "1048576")) as r:
            await r.read()
        baseline = proc.rss_kib()
        peak = baseline
        got = hashlib.sha256()
        size = 0
        async with s.get(url) as r:
            assert r.status == 200 and r.headers["Content-Type"] == "image/jpeg"
            async for chunk in r.content.iter_chunked(256 * 1024):
                got.update(chunk)
                size += len(chunk)
                peak = max(peak, proc.rss_kib())
                await asyncio.sleep(0)  # a slow reader: backpressure must hold
    assert size == 20 * MIB
    assert got.hexdigest() == expected.hexdigest()
    growth_mib = (peak - baseline) / 1024
    print(f"RSS baseline {baseline / 1024:.1f} MiB, peak {peak / 1024:.1f} MiB, growth {growth_mib:.1f} MiB")
    assert growth_mib < 8, f"RSS grew {growth_mib:.1f} MiB for a 20 MiB download"


@pytest.mark.parametrize("loop", ["default", "asyncio"])
async def test_sigterm_stops_the_sidecar_with_exit_0(sim, spawn, http, loop):
    port, admin = free_port(), free_port()
    env = {"SIDECAR_LOOP": "asyncio"} if loop == "asyncio" else {}
    proc = spawn(sidecar_yaml(sim.url, listen_port=port, admin_port=admin), env=env)
    await proc.wait_ready(f"http://127.0.0.1:{admin}")
    async with http.get(f"http://127.0.0.1:{port}/cgi-bin/user/info") as resp:
        assert resp.status == 200
    started = time.monotonic()
    assert proc.stop(signal.SIGTERM) == 0
    assert time.monotonic() - started < 5
    try:
        import uvloop  # noqa: F401
        expected = "asyncio" if loop == "asyncio" else "uvloop"
    except ImportError:
        expected = "asyncio"
    assert f"(event loop: {expected})" in proc.output()


def test_console_script_is_installed():
    script = shutil.which("wechat-token-sidecar", path=os.path.dirname(sys.executable))
    assert script, "pip install -e . should install the wechat-token-sidecar script"
    result = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0 and "run" in result.stdout and "demo" in result.stdout


def run_demo(tmp_path, *flags: str) -> tuple[str, list[str], list[str], subprocess.Popen]:
    """Start `python -m proxy demo`, run every curl line it prints; (banner,
    commands, their outputs, the process)."""
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    port, admin = free_port(), free_port()
    proc = subprocess.Popen([sys.executable, "-m", "proxy", "demo", "--port", str(port), "--admin-port", str(admin),
                             *flags], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines: list[str] = []
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if "Press Ctrl-C" in line:
            break
    banner = "".join(lines)
    commands = [l.strip() for l in lines if l.strip().startswith("curl ")]
    outputs = []
    for command in commands:
        result = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=20, cwd=tmp_path)
        assert result.returncode == 0, (command, result.stderr)
        outputs.append(result.stdout)
    return banner, commands, outputs, proc


def stop_demo(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
    assert proc.returncode == 0


def test_demo_prints_curl_lines_that_work(tmp_path):
    banner, commands, outputs, proc = run_demo(tmp_path)
    try:
        assert "(ready)" in banner, banner
        assert len(commands) >= 8
        joined = "\n".join(outputs)
        # the call after the rotation succeeded (replayed), the download completed, all apps ready
        assert joined.count('"errcode": 0') >= 3
        assert re.search(r"^200 1048576 bytes$", joined, re.M)
        assert '"status": "ready"' in joined
        assert '"ticket": "SIM_TK_jsapi_' in joined and '"signature": "' in joined
        # the simulator's push reached the demo app through the sidecar; the app's reply came back encrypted
        assert "you said: hello" in joined and '"encrypted": true' in joined
        # WeChat Pay: an order signed by the sidecar, the page's signed parameters, a notification delivered
        assert '"prepay_id": "wx' in joined and '"paySign": "' in joined and '"status": 204' in joined
        stats = json.loads(outputs[-1])
        # start-up, the rotation, and the admin refresh, unless that came within
        # 0.5 s of the rotation's refresh: then that refresh is its answer
        assert sum(stats["fetches"].values()) in (2, 3), stats
        assert stats["ticket_fetches"] == {"jsapi": 1}  # getticket and jssdk share one ticket
    finally:
        stop_demo(proc)


def test_demo_platform_shows_the_open_platform_flow_with_working_curl_lines(tmp_path):
    banner, commands, outputs, proc = run_demo(tmp_path, "--platform")
    try:
        assert "(ready)" in banner, banner
        by_command = dict(zip(commands, outputs))
        authorize = next(o for c, o in by_command.items() if "/_sim/component/authorize" in c)
        assert json.loads(authorize)["pushed"] == 200
        for command, output in by_command.items():
            if "/plat/" in command:
                assert json.loads(output)["errcode"] == 0, (command, output)
        calls = [json.loads(o) for c, o in by_command.items() if "/plat/" in c]
        assert calls[0]["access_token"] == calls[1]["access_token"] != []       # the authorizer's token
        assert calls[2]["component_access_token"] != [] and calls[2]["access_token"] == []
        listing = json.loads(next(o for c, o in by_command.items() if "/admin/authorizers" in c))
        assert listing["authorizers"] == 1 and listing["page"][0]["usable"] is True
        stats = json.loads(outputs[-1])
        assert stats["authorizer_fetches"] == 1
    finally:
        stop_demo(proc)


async def test_a_sidecar_that_cannot_listen_exits_without_fetching_a_token(sim, spawn):
    port, admin = free_port(), free_port()
    first = spawn(sidecar_yaml(sim.url, listen_port=port, admin_port=admin, token_api="client_credential"))
    await first.wait_ready(f"http://127.0.0.1:{admin}")
    fetches = sim.attempt_count()
    second = spawn(sidecar_yaml(sim.url, listen_port=port, admin_port=free_port(), token_api="client_credential"),
                   name="second")
    for _ in range(200):
        if second.proc.poll() is not None:
            break
        await asyncio.sleep(0.05)
    assert second.proc.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in second.output()
    assert sim.attempt_count() == fetches   # the first sidecar's token was not invalidated


async def test_sigterm_lets_a_slow_in_flight_call_finish_then_exits_0(sim, spawn, http):
    port, admin = free_port(), free_port()
    proc = spawn(sidecar_yaml(sim.url, listen_port=port, admin_port=admin, top="shutdown_grace_s: 5"))
    await proc.wait_ready(f"http://127.0.0.1:{admin}")
    sim.settings.latency_s = 1.5

    async def slow_call() -> tuple[int, dict]:
        async with http.post(f"http://127.0.0.1:{port}/cgi-bin/message/custom/send", data=b'{"m":1}') as resp:
            return resp.status, await resp.json()

    call = asyncio.create_task(slow_call())
    await asyncio.sleep(0.4)                          # the call is in flight upstream
    signalled = time.monotonic()
    proc.proc.send_signal(signal.SIGTERM)
    status, body = await call
    assert (status, body["errcode"]) == (200, 0)
    for _ in range(100):
        if proc.proc.poll() is not None:
            break
        await asyncio.sleep(0.05)
    assert proc.proc.returncode == 0
    assert time.monotonic() - signalled < 5
    with pytest.raises(aiohttp.ClientConnectionError):
        async with http.get(f"http://127.0.0.1:{port}/cgi-bin/user/info") as resp:
            await resp.read()
    assert '"event": "stopped"' in proc.output()


async def test_sighup_applies_a_new_secret_and_refuses_a_broken_config(sim, spawn, http):
    port, admin = free_port(), free_port()
    base, admin_url = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{admin}"
    proc = spawn(sidecar_yaml(sim.url, listen_port=port, admin_port=admin, secret="not-the-secret"))
    await asyncio.sleep(0.8)
    async with http.get(f"{admin_url}/readyz") as resp:
        assert resp.status == 503                     # 40125: wrong secret
    proc.config_path.write_text(sidecar_yaml(sim.url, listen_port=port, admin_port=admin))
    proc.proc.send_signal(signal.SIGHUP)
    await proc.wait_ready(admin_url, timeout=5)       # the new secret took effect
    async with http.get(f"{base}/cgi-bin/user/info") as resp:
        assert resp.status == 200

    proc.config_path.write_text("apps: [{name: mp, appid: x}]\n")   # broken: no secret
    proc.proc.send_signal(signal.SIGHUP)
    await asyncio.sleep(0.5)
    for _ in range(5):
        async with http.get(f"{base}/cgi-bin/user/info") as resp:
            assert resp.status == 200                 # the old config keeps serving
    assert proc.proc.poll() is None
    out = proc.output()
    assert "config reload refused" in out and "apps[0].secret" in out
    assert "not-the-secret" not in out and SECRET not in out


async def test_sighup_with_a_new_egress_proxy_is_refused_with_a_restart_line(sim, spawn, http):
    port, admin = free_port(), free_port()
    base = f"http://127.0.0.1:{port}"
    proc = spawn(sidecar_yaml(sim.url, listen_port=port, admin_port=admin))
    await proc.wait_ready(f"http://127.0.0.1:{admin}", timeout=5)
    changed = sidecar_yaml(sim.url, listen_port=port, admin_port=admin).replace(
        "timeout_s: 5}", 'timeout_s: 5, proxy: "http://127.0.0.1:9"}')
    assert "proxy:" in changed
    proc.config_path.write_text(changed)
    proc.proc.send_signal(signal.SIGHUP)
    for _ in range(50):
        if "config reload refused" in proc.output():
            break
        await asyncio.sleep(0.1)
    out = proc.output()
    assert "config reload refused" in out and "upstream.proxy" in out and "restart the sidecar" in out
    async with http.get(f"{base}/cgi-bin/user/info") as resp:       # still straight to WeChat, no proxy
        assert resp.status == 200


def replace_atomically(path, text: str) -> None:
    """As the kubelet updates a mounted Secret or ConfigMap: a new file swapped in."""
    fresh = path.with_name(path.name + ".new")
    fresh.write_text(text)
    os.replace(fresh, path)


async def test_a_changed_secret_file_or_config_file_is_reloaded_without_a_signal(sim, spawn, http, tmp_path):
    port, admin = free_port(), free_port()
    base, admin_url = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{admin}"
    secret_file = tmp_path / "appsecret"
    secret_file.write_text("not-the-secret\n")
    text = sidecar_yaml(sim.url, listen_port=port, admin_port=admin, top="reload_poll_s: 0.2",
                        secret="PLACEHOLDER").replace('secret: "PLACEHOLDER"', f"secret_file: {secret_file}")
    proc = spawn(text)
    await wait_until(lambda: '"errcode": 40125' in proc.output(), timeout=10)   # wrong secret
    async with http.get(f"{admin_url}/readyz") as resp:
        assert resp.status == 503
    replace_atomically(secret_file, SECRET + "\n")   # the Secret is updated: no SIGHUP
    await proc.wait_ready(admin_url, timeout=5)
    async with http.get(f"{base}/cgi-bin/user/info") as resp:
        assert resp.status == 200

    replace_atomically(proc.config_path, "apps: [{name: mp, appid: x}]\n")   # a broken ConfigMap
    await asyncio.sleep(1.0)                          # five polls
    async with http.get(f"{base}/cgi-bin/user/info") as resp:
        assert resp.status == 200                     # the running config stays
    out = proc.output()
    assert f"{secret_file} changed" in out and f"{proc.config_path} changed" in out
    assert out.count("config reload refused") == 1    # reported once, not at every poll
    assert SECRET not in out and "not-the-secret" not in out


async def test_log_access_false_drops_call_lines_but_keeps_token_events(sim, spawn, http):
    port, admin = free_port(), free_port()
    proc = spawn(sidecar_yaml(sim.url, listen_port=port, admin_port=admin, top="log: {access: false}"))
    await proc.wait_ready(f"http://127.0.0.1:{admin}")
    for _ in range(3):
        async with http.get(f"http://127.0.0.1:{port}/cgi-bin/user/info") as resp:
            assert resp.status == 200
    assert proc.stop() == 0
    events = [json.loads(line).get("event") for line in proc.output().splitlines()]
    assert "token_fetched" in events and "call" not in events


async def test_what_start_up_made_is_kept_out_of_garbage_collection(sim, http):
    """`run` freezes what start-up made (modules, config, clients: tens of
    thousands of objects that live as long as the process), so that a full
    collection does not walk them all while calls wait (~45 ms with Redis)."""
    import gc

    from proxy import config as config_mod
    from proxy.server import serve

    port, admin = free_port(), free_port()
    cfg = config_mod.parse(sidecar_yaml(sim.url, listen_port=port, admin_port=admin), "<test>", env={})
    assert gc.get_freeze_count() == 0
    task = asyncio.create_task(serve(cfg))
    try:
        def alive() -> None:
            assert not task.done(), task
        assert await wait_ready(http, f"http://127.0.0.1:{admin}", 10, alive)
        assert gc.get_freeze_count() > 10_000
        async with http.get(f"http://127.0.0.1:{port}/cgi-bin/user/info?openid=o") as resp:
            assert resp.status == 200
        os.kill(os.getpid(), signal.SIGTERM)          # serve's own handler stops it
        assert await asyncio.wait_for(task, 10) == 0
    finally:
        gc.unfreeze()
        if not task.done():
            task.cancel()
