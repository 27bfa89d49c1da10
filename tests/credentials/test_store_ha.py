"""The shared store at production scale, with real processes: a Sentinel
failover under load (with a write the promoted replica missed), Redis
restarted empty, and a Redis Cluster (DESIGN.md, "The store at scale")."""
from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import aiohttp
import pytest

from proxy import config as config_mod

from ..conftest import APPID, APPID2, sidecar_yaml
from ..ports import free_port
from .test_redis_store import Replica, all_ready, call, ok

REDIS = shutil.which("redis-server")
pytestmark = pytest.mark.skipif(REDIS is None, reason="redis-server is not installed (.ci/run installs it)")


def resp(port: int, *args: str) -> bytes:
    """One RESP command over a plain socket."""
    parts = [f"*{len(args)}\r\n".encode()]
    for arg in args:
        data = arg.encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    with socket.create_connection(("127.0.0.1", port), timeout=2) as conn:
        conn.sendall(b"".join(parts))
        time.sleep(0.02)
        return conn.recv(65536)


def wait_for(condition, timeout: float = 15.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if condition():
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"{what} not reached in {timeout} s")


class Proc:
    """A redis-server (or sentinel) of our own; ended by its PID."""

    def __init__(self, args: list[str], port: int):
        self.port = port
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: resp(port, "PING").startswith(b"+PONG"), 10, f"redis on {port}")

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def sentinel_set(tmp_path: Path):
    """A master, one replica and three sentinels (quorum 2), all on free ports."""
    procs: list[Proc] = []
    base = [REDIS, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(tmp_path)]
    master_port, replica_port = free_port(), free_port()
    master = Proc([*base, "--port", str(master_port)], master_port)
    procs.append(master)
    replica = Proc([*base, "--port", str(replica_port), "--replicaof", "127.0.0.1", str(master_port)], replica_port)
    procs.append(replica)
    wait_for(lambda: b"master_link_status:up" in resp(replica_port, "INFO", "replication"), 10, "replication")
    sentinels = []
    for i in range(3):
        port = free_port()
        conf = tmp_path / f"sentinel{i}.conf"
        conf.write_text(f"port {port}\nbind 127.0.0.1\ndir {tmp_path}\n"
                        f"sentinel monitor mymaster 127.0.0.1 {master_port} 2\n"
                        "sentinel down-after-milliseconds mymaster 1000\n"
                        "sentinel failover-timeout mymaster 4000\n")
        sentinels.append(Proc([REDIS, str(conf), "--sentinel"], port))
    procs.extend(sentinels)
    for s in sentinels:     # every sentinel knows the replica and the two other sentinels
        wait_for(lambda s=s: resp(s.port, "SENTINEL", "REPLICAS", "mymaster").count(b"127.0.0.1") >= 1
                 and resp(s.port, "SENTINEL", "SENTINELS", "mymaster").count(b"127.0.0.1") >= 2,
                 20, "sentinel discovery")
    yield master, replica, sentinels
    for proc in procs:
        proc.stop()


def master_port_of(sentinel: Proc) -> int:
    answer = resp(sentinel.port, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", "mymaster")
    return int(answer.split(b"\r\n")[-2])


def metric(text: str, name: str) -> float:
    match = re.search(rf"^{name} (\S+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


async def metrics(http: aiohttp.ClientSession, replica: Replica) -> str:
    async with http.get(f"{replica.admin}/metrics") as r:
        return await r.text()


def stored_token(port: int) -> bytes:
    return resp(port, "HGET", f"t:token:{{stable:{APPID}}}", "value")


async def test_a_sentinel_failover_under_load_fails_no_call_and_rewinds_nobody(sim, sentinel_set, spawn, http):
    master, replica, sentinels = sentinel_set
    hosts = ", ".join(f'"127.0.0.1:{s.port}"' for s in sentinels)
    store = f'store: {{kind: redis, key_prefix: "t:", sentinel: {{hosts: [{hosts}], service: mymaster}}}}'
    replicas = []
    for i in range(2):
        port, admin = free_port(), free_port()
        replicas.append(Replica(spawn(sidecar_yaml(sim.url, listen_port=port, admin_port=admin, top=store),
                                      name=f"s{i}"), port, admin))
    await all_ready(replicas)
    seen: dict[int, list[str]] = {0: [], 1: []}
    failures: list[tuple[int, dict]] = []
    stop = asyncio.Event()

    async def load() -> None:                       # a steady trickle through both sidecars
        while not stop.is_set():
            for i, r in enumerate(replicas):
                result = await call(http, r)
                if ok(result):
                    seen[i].append(result[1]["access_token"][0])
                else:
                    failures.append(result)
            await asyncio.sleep(0.02)

    traffic = asyncio.create_task(load())
    try:
        await _failover(sim, master, replica, sentinels, replicas, seen, http)
    finally:
        stop.set()
        await traffic
    assert failures == []                           # zero failed calls while the token was valid


async def _failover(sim, master, replica, sentinels, replicas, seen, http) -> None:
    first = sim.current[f"stable:{APPID}"].value
    await asyncio.sleep(0.3)
    # The replica is cut off (stopped, its link closed by the master, so
    # nothing is left in flight to it) while the token is replaced: it misses
    # that write.
    replica.signal(signal.SIGSTOP)
    assert resp(master.port, "CLIENT", "KILL", "TYPE", "replica").startswith(b":1")
    sim.rotate(APPID, "stable", grace_s=0)
    second = sim.current[f"stable:{APPID}"].value
    for i in (0, 1):
        await asyncio.wait_for(_until(lambda i=i: seen[i] and seen[i][-1] == second), 10)
    assert stored_token(master.port).endswith(second.encode() + b"\r\n")
    fetches = sim.fetch_count()
    master.stop()                                   # kill -9 the master
    replica.signal(signal.SIGCONT)
    await asyncio.wait_for(_until(lambda: master_port_of(sentinels[0]) == replica.port), 30)
    assert first.encode() in stored_token(replica.port)   # the promoted replica had missed the write
    # The sidecars follow by themselves, and write back the newer token they hold.
    await asyncio.wait_for(_until(lambda: second.encode() in stored_token(replica.port)), 20)
    for r in replicas:
        text = await metrics(http, r)
        assert metric(text, "wts_store_reconnects_total") >= 1
        assert metric(text, "wts_store_failovers_total") >= 1
        async with http.get(f"{r.admin}/readyz") as resp_:
            assert resp_.status == 200
    await asyncio.sleep(0.5)
    for i in (0, 1):
        after = seen[i][seen[i].index(second):]
        assert first not in after                   # never moved back to the older token
    assert sim.fetch_count() - fetches <= 1


async def _until(condition) -> None:
    while True:
        try:
            if condition():
                return
        except OSError:
            pass
        await asyncio.sleep(0.05)


async def test_redis_restarted_empty_is_refilled_by_the_sidecars_without_a_fetch(sim, redis_server, spawn, http):
    from .test_redis_store import start_replicas
    replicas = start_replicas(spawn, sim, redis_server, 2)
    await all_ready(replicas)
    token = sim.current[f"stable:{APPID}"].value
    assert sim.fetch_count() == 1
    redis_server.kill()
    redis_server.start()                            # same port, nothing in it
    assert redis_server.command("EXISTS", f"t:token:{{stable:{APPID}}}") == b":0\r\n"
    await asyncio.wait_for(_until(lambda: token.encode() in redis_server.command(
        "HGET", f"t:token:{{stable:{APPID}}}", "value")), 20)
    assert sim.fetch_count() == 1                   # refilled from the sidecars' copies
    assert all(ok(r) for r in await asyncio.gather(*(call(http, r) for r in replicas)))
    sim.rotate(APPID, "stable", grace_s=0)
    assert all(ok(r) for r in await asyncio.gather(*(call(http, r) for r in replicas for _ in range(5))))
    assert sim.fetch_count() == 2                   # one fetch for the rotation, cluster-wide


@pytest.fixture
def redis_cluster(tmp_path: Path):
    """Three masters in a Redis Cluster (no replicas), on free ports."""
    cli = shutil.which("redis-cli")
    if cli is None:
        pytest.skip("redis-cli is not installed")
    nodes = []
    for i in range(3):
        port = free_port(also=10000)            # the cluster bus listens on port + 10000
        node_dir = tmp_path / f"node{i}"
        node_dir.mkdir()
        nodes.append(Proc([REDIS, "--port", str(port), "--bind", "127.0.0.1", "--cluster-enabled", "yes",
                           "--cluster-config-file", str(node_dir / "nodes.conf"), "--save", "", "--appendonly", "no",
                           "--dir", str(node_dir)], port))
    subprocess.run([cli, "--cluster", "create", *(f"127.0.0.1:{n.port}" for n in nodes), "--cluster-replicas", "0",
                    "--cluster-yes"], check=True, capture_output=True, timeout=30)
    for n in nodes:
        wait_for(lambda n=n: b"cluster_state:ok" in resp(n.port, "CLUSTER", "INFO"), 20, "cluster ok")
    yield nodes
    for n in nodes:
        n.stop()


async def test_a_redis_cluster_shares_tokens_and_news_across_slots(sim, redis_cluster, spawn, http):
    from ..conftest import mini_app_yaml
    store = f'store: {{kind: redis, cluster: true, url: "redis://127.0.0.1:{redis_cluster[0].port}/0", key_prefix: "t:"}}'
    replicas = []
    for i in range(2):
        port, admin = free_port(), free_port()
        replicas.append(Replica(spawn(sidecar_yaml(sim.url, listen_port=port, admin_port=admin, top=store,
                                                   app=mini_app_yaml("stable")), name=f"c{i}"), port, admin))
    await all_ready(replicas)
    # Two credentials whose keys live on different nodes, one fetch each for both sidecars.
    slots = {int(resp(redis_cluster[0].port, "CLUSTER", "KEYSLOT", f"t:token:{{stable:{a}}}").split(b":")[1])
             for a in (APPID, APPID2)}
    assert len(slots) == 2
    for app in ("mp", "mini"):
        results = await asyncio.gather(*(call(http, r, f"/{app}/cgi-bin/user/info") for r in replicas for _ in range(5)))
        assert all(ok(x) for x in results)
    assert sim.fetch_count(appid=APPID) == 1 and sim.fetch_count(appid=APPID2) == 1
    # A rotation seen by one sidecar only: the other hears the news (classic
    # pub/sub reaches every node's subscribers) and follows without a fetch.
    sim.rotate(APPID2, "stable", grace_s=0)
    assert ok(await call(http, replicas[0], "/mini/cgi-bin/user/info"))
    new = sim.current[f"stable:{APPID2}"].value
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        status, body = await call(http, replicas[1], "/mini/cgi-bin/user/info")
        if body.get("access_token") == [new]:
            break
        await asyncio.sleep(0.05)
    assert body["access_token"] == [new]
    assert sim.fetch_count(appid=APPID2) == 2
    async with http.get(f"{replicas[1].admin}/admin/apps") as r:
        mini = next(a for a in (await r.json())["apps"] if a["name"] == "mini")
    assert mini["refreshes"].get("errcode", 0) == 0   # it never needed its own refresh


def test_sentinel_and_cluster_configs_are_checked():
    base = sidecar_yaml("http://127.0.0.1:1")
    good = config_mod.parse(base.replace("admin:", 'store: {kind: redis, sentinel: {hosts: ["h1:26379", "[::1]:26380"], '
                                                   'service: mymaster, password: pw}}\nadmin:'), "c.yaml", env={})
    assert good.store.sentinel.hosts == (("h1", 26379), ("::1", 26380))
    assert "pw" not in good.summary() and "sentinel mymaster via h1:26379" in good.summary()
    for store, key, why in (
            ('{kind: redis, sentinel: {hosts: ["h1"], service: m}}', "store.sentinel.hosts[0]", "host:port"),
            ('{kind: redis, sentinel: {hosts: [], service: m}}', "store.sentinel.hosts", "non-empty"),
            ('{kind: redis, url: "redis://x", sentinel: {hosts: ["h:1"], service: m}}', "store.sentinel", "not both"),
            ('{kind: redis, cluster: true, url: "unix:///tmp/r.sock"}', "store.url", "TCP"),
            ('{kind: redis, sentinel: {hosts: ["h:1"]}}', "store.sentinel.service", "required")):
        with pytest.raises(config_mod.ConfigError) as info:
            config_mod.parse(base.replace("admin:", f"store: {store}\nadmin:"), "c.yaml", env={})
        assert f"c.yaml: {key}" in str(info.value) and why in str(info.value)
