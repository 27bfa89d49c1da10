"""proxy/credentials/redis_store.py: one token for every replica. A real
redis-server on a free port, real sidecar subprocesses, the simulator as WeChat."""
from __future__ import annotations

import asyncio
import signal
import time
from typing import Callable

import aiohttp
import pytest

from proxy import config as config_mod

from ..conftest import APPID, free_port, sidecar_yaml, wait_until


class Replica:
    def __init__(self, proc, port: int, admin: int):
        self.proc, self.base, self.admin = proc, f"http://127.0.0.1:{port}", f"http://127.0.0.1:{admin}"


def cluster_yaml(sim, redis_server, port: int, admin: int, *, store_extra: str = "", **kw) -> str:
    store = f'store: {{kind: redis, url: "{redis_server.url}", key_prefix: "t:"{store_extra}}}'
    return sidecar_yaml(sim.url, listen_port=port, admin_port=admin, top=store, **kw)


def spawn_replicas(spawn, n: int, config: Callable[[int, int, int], str], name: str = "replica") -> list[Replica]:
    """n sidecar processes, the i-th with config(i, proxy port, admin port)."""
    replicas = []
    for i in range(n):
        port, admin = free_port(), free_port()
        replicas.append(Replica(spawn(config(i, port, admin), name=f"{name}{i}"), port, admin))
    return replicas


def start_replicas(spawn, sim, redis_server, n: int, **kw) -> list[Replica]:
    return spawn_replicas(spawn, n, lambda i, port, admin: cluster_yaml(sim, redis_server, port, admin, **kw))


async def all_ready(replicas: list[Replica], timeout: float = 10) -> None:
    await asyncio.gather(*(r.proc.wait_ready(r.admin, timeout) for r in replicas))


async def call(http: aiohttp.ClientSession, replica: Replica, path: str = "/cgi-bin/user/info") -> tuple[int, dict]:
    async with http.get(replica.base + path) as resp:
        return resp.status, await resp.json()


def ok(result: tuple[int, dict]) -> bool:
    status, body = result
    return status == 200 and body.get("errcode") == 0


async def burst(http, replicas, per_replica: int = 30) -> list[tuple[int, dict]]:
    return await asyncio.gather(*(call(http, r) for r in replicas for _ in range(per_replica)))


async def test_three_replicas_make_one_fetch_between_them(sim, redis_server, spawn, http):
    replicas = start_replicas(spawn, sim, redis_server, 3)
    await all_ready(replicas)
    results = await burst(http, replicas)
    assert all(ok(r) for r in results)
    assert sim.fetch_count() == 1
    tokens = {body["access_token"][0] for _, body in results}
    assert len(tokens) == 1                      # every replica serves the same token


async def test_a_rotation_seen_by_all_replicas_at_once_costs_one_fetch(sim, redis_server, spawn, http):
    replicas = start_replicas(spawn, sim, redis_server, 3)
    await all_ready(replicas)
    sim.rotate(APPID, "stable", grace_s=0)
    before = sim.fetch_count()
    results = await burst(http, replicas)
    assert all(ok(r) for r in results), [r for r in results if not ok(r)][:3]
    assert sim.fetch_count() - before == 1


async def test_proactive_refresh_across_replicas_is_one_fetch_per_cycle(sim, redis_server, spawn, http):
    sim.settings.ttl_s = 3.0
    sim.settings.grace_s = 1.0                   # a replica left on the old token would fail
    replicas = start_replicas(spawn, sim, redis_server, 3, token_api="client_credential",
                              refresh_before_s=1.5)
    await all_ready(replicas)
    start_fetches = len(sim.fetch_times)
    loop = asyncio.get_running_loop()
    end = loop.time() + 7.5                      # five cycles of 1.5 s
    failures, calls = [], 0
    while loop.time() < end:
        for result in await burst(http, replicas, per_replica=2):
            calls += 1
            if not ok(result):
                failures.append(result)
        await asyncio.sleep(0.02)
    assert failures == []
    times = sim.fetch_times[start_fetches:]
    assert 4 <= len(times) <= 6, times
    gaps = [b - a for a, b in zip(times[:-1], times[1:], strict=True)]
    assert min(gaps) > 1.0, gaps                 # never two fetches in one cycle
    for r in replicas:
        async with http.get(f"{r.admin}/admin/apps") as resp:
            assert (await resp.json())["apps"][0]["refreshes"].get("errcode", 0) == 0


async def test_killing_the_lock_holder_mid_fetch_lets_another_take_over(sim, redis_server, spawn, http):
    sim.settings.token_latency_s = 5.0           # the first fetch hangs (lease: 3 s)
    replicas = start_replicas(spawn, sim, redis_server, 3)
    owner = b""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        owner = redis_server.command("GET", f"t:lock:{{stable:{APPID}}}")
        if owner.startswith(b"$") and not owner.startswith(b"$-1"):
            break
        await asyncio.sleep(0.05)
    holder_pid = int(owner.split(b"\r\n")[1].decode().split(":")[1])
    holder = next(r for r in replicas if r.proc.pid == holder_pid)
    holder.proc.stop(signal.SIGKILL)
    sim.settings.token_latency_s = 0.0
    killed_at = time.monotonic()
    others = [r for r in replicas if r is not holder]
    await all_ready(others, timeout=10)
    took = time.monotonic() - killed_at
    assert took < 6, f"takeover took {took:.1f} s"
    results = await burst(http, others, per_replica=5)
    assert all(ok(r) for r in results)


async def test_daily_fetch_cap_is_shared_and_stops_fetching(sim, redis_server, spawn, http):
    replicas = start_replicas(spawn, sim, redis_server, 3, store_extra=", daily_fetch_cap: 2")
    await all_ready(replicas)
    sim.rotate(APPID, "stable", grace_s=0)
    assert all(ok(r) for r in await burst(http, replicas, per_replica=3))
    assert sim.fetch_count() == 2
    sim.rotate(APPID, "stable", grace_s=0)
    results = await burst(http, replicas, per_replica=3)
    assert all(status == 503 for status, _ in results)
    assert "daily fetch cap of 2 reached" in results[0][1]["errmsg"]
    await asyncio.sleep(0.5)
    assert sim.fetch_count() == 2
    async with http.get(f"{replicas[0].admin}/readyz") as resp:
        assert resp.status == 503 and "daily fetch cap" in await resp.text()


async def test_a_reader_never_fetches_and_follows_the_fetcher(sim, redis_server, spawn, http):
    port, admin = free_port(), free_port()
    reader = Replica(spawn(cluster_yaml(sim, redis_server, port, admin, store_extra=", role: reader"),
                           name="reader"), port, admin)
    await asyncio.sleep(1.5)
    async with http.get(f"{reader.admin}/readyz") as resp:
        assert resp.status == 503
    assert sim.attempt_count() == 0
    fetcher = start_replicas(spawn, sim, redis_server, 1)[0]
    await all_ready([fetcher])
    await reader.proc.wait_ready(reader.admin, timeout=5)
    (_, via_reader), (_, via_fetcher) = await call(http, reader), await call(http, fetcher)
    assert via_reader["access_token"] == via_fetcher["access_token"]
    # a rotation seen only through the reader: the reader marks it, the fetcher fetches
    sim.rotate(APPID, "stable", grace_s=0)
    status, body = await call(http, reader)
    assert (status, body["errcode"]) == (200, 0)
    assert sim.fetch_count() == 2
    async with http.get(f"{reader.admin}/admin/apps") as resp:
        assert (await resp.json())["apps"][0]["fetches_ok"] == 0


async def test_redis_outage_keeps_calls_working_and_sharing_resumes(sim, redis_server, spawn, http):
    replicas = start_replicas(spawn, sim, redis_server, 3)
    await all_ready(replicas)
    redis_server.kill()
    for _ in range(3):
        assert all(ok(r) for r in await burst(http, replicas, per_replica=5))
        await asyncio.sleep(0.3)
    assert all(r.proc.proc.poll() is None for r in replicas)
    assert sim.fetch_count() == 1
    redis_server.start()                         # same port, empty
    await asyncio.sleep(1.0)
    sim.rotate(APPID, "stable", grace_s=0)
    before = sim.fetch_count()
    results = await burst(http, replicas)
    assert all(ok(r) for r in results)
    assert sim.fetch_count() - before == 1       # shared again: one fetch for the cluster
    assert "store" in replicas[0].proc.output()


async def test_unreachable_redis_at_start_fetches_locally_with_a_warning(sim, make_sidecar, http):
    dead = f"redis://127.0.0.1:{free_port()}/0"
    sc = await make_sidecar(top=f'store: {{kind: redis, url: "{dead}"}}')
    async with http.get(f"{sc.base}/cgi-bin/user/info") as resp:
        assert resp.status == 200
    assert sc.sidecar.managers["mp"].local_fetches_store_down == 1


async def test_on_store_down_fail_refuses_to_fetch_without_the_store(sim, make_sidecar, http):
    dead = f"redis://127.0.0.1:{free_port()}/0"
    sc = await make_sidecar(top=f'store: {{kind: redis, url: "{dead}", on_store_down: fail}}', wait_ready=False)
    await asyncio.sleep(0.5)
    async with http.get(f"{sc.base}/cgi-bin/user/info") as resp:
        assert resp.status == 503
        assert "store unavailable" in (await resp.json())["errmsg"]
    assert sim.attempt_count() == 0


@pytest.mark.parametrize("url, reason", [
    ("http://redis:6379", "must start with redis://"),
    ("redis://redis:notaport/0", "not a valid Redis URL"),
])
def test_a_wrong_redis_url_is_a_config_error(url, reason):
    with pytest.raises(config_mod.ConfigError) as info:
        config_mod.parse(f'store: {{kind: redis, url: "{url}"}}\napps: [{{name: a, appid: w, secret: s}}]',
                         "c.yaml", {})
    assert info.value.key == "store.url" and reason in info.value.reason


def test_the_redis_password_never_shows_in_the_summary():
    cfg = config_mod.parse('store: {kind: redis, url: "rediss://:hunter2pass@redis:6380/0"}\n'
                           'apps: [{name: a, appid: w, secret: s}]', "c.yaml", {})
    assert "hunter2pass" not in cfg.summary() and "rediss://:***@redis:6380/0" in cfg.summary()


# ---------------------------------------------------------------- compare-and-set, store errors

async def test_a_late_rejection_never_marks_the_newer_token_stored_since(redis_server):
    """Replica A saw T1 rejected but its message arrives after replica B
    stored T2: the rejection names T1, so T2 stays shared and unmarked."""
    from proxy.credentials import Token
    from proxy.credentials.redis_store import RedisStore

    store = RedisStore(redis_server.url, "cas:")
    seen: list[tuple[str, str]] = []
    await store.start()
    store.watch("mp", lambda event, fp: seen.append((event, fp)))
    try:
        now = time.monotonic()
        await store._save("mp", Token("T1", now, now + 7200))
        await store._save("mp", Token("T2", now, now + 7200))       # B's newer token
        assert await store.reject("mp", "T1") is False               # A's late rejection: no effect
        loaded = await store.load("mp")
        assert loaded is not None and loaded.value == "T2"
        assert redis_server.command("HGET", "cas:token:{mp}", "rejected") == b"$1\r\n0\r\n"
        assert await store.reject("mp", "T2") is True                # a rejection of the current one counts
        assert await store.reject("mp", "T2") is False               # once
        assert await store.load("mp") is None
        await wait_until(lambda: any(event == "rejected" for event, _ in seen))
    finally:
        await store.close()


async def test_store_errors_are_counted_in_the_metrics(sim, redis_server, make_sidecar, http):
    sc = await make_sidecar(top=f'store: {{kind: redis, url: "{redis_server.url}"}}')

    async def store_errors() -> float:
        async with http.get(f"{sc.admin}/metrics") as resp:
            for line in (await resp.text()).splitlines():
                if line.startswith("wts_store_errors_total "):
                    return float(line.split()[1])
        raise AssertionError("no wts_store_errors_total")

    assert await store_errors() == 0
    redis_server.kill()
    sim.rotate(APPID, "stable", grace_s=0)         # the refresh has to go through the store
    async with http.get(f"{sc.base}/cgi-bin/user/info") as resp:
        assert resp.status == 200                  # fetched locally: the store is down
    assert await store_errors() >= 1


async def test_two_sidecars_on_one_redis_fetch_one_ticket_between_them(sim, redis_server, spawn, http):
    replicas = start_replicas(spawn, sim, redis_server, 2)
    await all_ready(replicas)
    results = await asyncio.gather(*(call(http, r, "/cgi-bin/ticket/getticket?type=jsapi")
                                     for r in replicas for _ in range(10)))
    assert all(status == 200 for status, _ in results)
    assert len({body["ticket"] for _, body in results}) == 1
    assert sim.ticket_fetch_count("jsapi") == 1                  # one fetch for the cluster
