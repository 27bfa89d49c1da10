"""`make scale`: a platform app with 100,000 authorizers in a real Redis.

Starts its own redis-server, the WeChat simulator (`python -m
proxy.simulator`) and the sidecar (`python -m proxy run`), each a process of
its own, all on 127.0.0.1, and prints:
  - start-up time (spawn to /readyz 200) with 100,000 authorizers in Redis
    and with none, in turn, median of 7 each (target: unchanged);
  - the import of 100,000 authorizers through POST /admin/authorizers;
  - calls to 10,000 distinct authorizers: fetches (target: exactly one per
    used authorizer), failures (target 0), RSS growth per cached authorizer;
  - p50/p99 of a call whose authorizer token is cached against an ordinary
    app call, one connection, interleaved, in 5 rounds of 4,000 pairs: the
    median of the rounds' p99 ratios (target: within 10 %);
  - a restarted sidecar serving authorizers from Redis with no new fetch.
Bounded: about a minute; stops everything it started.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from run import free_port, mem_kib, stop  # noqa: E402  (make bench's helpers)
from proxy.simulator import (DEMO_APPID, DEMO_COMPONENT_AES_KEY, DEMO_COMPONENT_APPID,  # noqa: E402
                             DEMO_COMPONENT_SECRET, DEMO_COMPONENT_TOKEN, DEMO_SECRET)








def config(tmp: Path, port: int, admin: int, sim: str, redis_port: int, prefix: str = "scale:") -> Path:
    path = tmp / f"sidecar-{prefix.strip(':')}.yaml"
    path.write_text(f"""
listen: {{host: 127.0.0.1, port: {port}}}
admin:  {{host: 127.0.0.1, port: {admin}}}
upstream: {{base_url: "{sim}", timeout_s: 10}}
store: {{kind: redis, url: "redis://127.0.0.1:{redis_port}/0", key_prefix: "{prefix}"}}
log: {{level: warning, access: false}}
apps:
  - name: plat
    appid: {DEMO_COMPONENT_APPID}
    secret: {DEMO_COMPONENT_SECRET}
    token_api: component
    token: {DEMO_COMPONENT_TOKEN}
    encoding_aes_key: {DEMO_COMPONENT_AES_KEY}
  - name: mp
    appid: {DEMO_APPID}
    secret: {DEMO_SECRET}
""")
    return path


class Sidecar:
    def __init__(self, path: Path, port: int, admin: int, log: Path):
        self.base, self.admin = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{admin}"
        self.log = open(log, "ab")
        self.started = time.monotonic()
        self.proc = subprocess.Popen([PY, "-m", "proxy", "run", "--config", str(path)], cwd=ROOT,
                                     stdout=self.log, stderr=subprocess.STDOUT)

    async def ready(self, http: aiohttp.ClientSession, timeout: float = 30) -> float:
        deadline = self.started + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("the sidecar exited; see its log")
            try:
                async with http.get(self.admin + "/readyz") as resp:
                    if resp.status == 200:
                        return time.monotonic() - self.started
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.005)
        raise RuntimeError("the sidecar did not become ready")

    def stop(self) -> None:
        stop(self.proc)
        self.log.close()


async def start_times(http, path, port, admin, log, n: int) -> list[float]:
    times = []
    for _ in range(n):
        sidecar = Sidecar(path, port, admin, log)
        times.append(await sidecar.ready(http))
        sidecar.stop()
    return times


async def component_ready(http: aiohttp.ClientSession, sidecar: Sidecar) -> None:
    for _ in range(500):
        async with http.get(sidecar.admin + "/admin/apps") as resp:
            apps = {a["name"]: a for a in (await resp.json())["apps"]}
        if apps["plat"]["usable"]:
            return
        await asyncio.sleep(0.02)
    raise RuntimeError("no component token")


async def sim_stats(http: aiohttp.ClientSession, sim: str) -> dict:
    async with http.get(sim + "/_sim/stats") as resp:
        return await resp.json()


async def timed(http: aiohttp.ClientSession, url: str) -> float:
    started = time.perf_counter()
    async with http.get(url) as resp:
        await resp.read()
        assert resp.status == 200, resp.status
    return time.perf_counter() - started


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def run(args: argparse.Namespace) -> dict:
    redis_bin = shutil.which("redis-server")
    if redis_bin is None:
        raise SystemExit("redis-server is not installed (apt-get install redis-server)")
    results: dict = {"authorizers": args.authorizers, "used": args.used}
    with tempfile.TemporaryDirectory(prefix="wts-scale-") as tmp_name:
        tmp = Path(tmp_name)
        redis_port, sim_port, port, admin = free_port(), free_port(), free_port(), free_port()
        redis = subprocess.Popen([redis_bin, "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
                                  "--appendonly", "no", "--dir", str(tmp)], stdout=subprocess.DEVNULL)
        sim_proc = subprocess.Popen([PY, "-m", "proxy.simulator", "--port", str(sim_port)], cwd=ROOT)
        sim = f"http://127.0.0.1:{sim_port}"
        path = config(tmp, port, admin, sim, redis_port)
        log = tmp / "sidecar.log"
        sidecar = None
        try:
            connector = aiohttp.TCPConnector(limit=args.concurrency)
            async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as http:
                for _ in range(500):
                    try:
                        await sim_stats(http, sim)
                        break
                    except aiohttp.ClientError:
                        await asyncio.sleep(0.02)
                sidecar = Sidecar(path, port, admin, log)
                await sidecar.ready(http)
                async with http.post(sim + "/_sim/settings",
                                     json={"push_url": sidecar.base + "/sidecar/component/event"}) as resp:
                    assert resp.status == 200
                async with http.post(sim + "/_sim/component/push_ticket") as resp:
                    assert (await resp.json())["pushed"] == 200
                await component_ready(http, sidecar)

                import_s = 0.0
                batch = 10_000
                for start in range(0, args.authorizers, batch):
                    async with http.post(f"{sim}/_sim/component/bulk_authorize?start={start}"
                                         f"&count={min(batch, args.authorizers - start)}") as resp:
                        entries = await resp.json()
                    began = time.monotonic()
                    async with http.post(sidecar.admin + "/admin/authorizers?app=plat", json=entries) as resp:
                        assert resp.status == 200, await resp.text()
                    import_s += time.monotonic() - began
                results["import_s"] = round(import_s, 2)

                for _ in range(200):          # warm: the app path and the client
                    await timed(http, sidecar.base + "/mp/cgi-bin/user/info")
                before = await sim_stats(http, sim)
                rss_before = mem_kib(sidecar.proc.pid, "VmRSS")
                semaphore = asyncio.Semaphore(args.concurrency)
                failures = 0

                async def first_call(n: int) -> None:
                    nonlocal failures
                    async with semaphore:
                        async with http.get(f"{sidecar.base}/plat/wx{n:016x}/cgi-bin/user/info") as resp:
                            body = await resp.json(content_type=None)
                            if resp.status != 200 or body.get("errcode") != 0:
                                failures += 1

                began = time.monotonic()
                await asyncio.gather(*(first_call(n) for n in range(args.used)))
                results["first_calls_s"] = round(time.monotonic() - began, 2)
                after = await sim_stats(http, sim)
                rss_after = mem_kib(sidecar.proc.pid, "VmRSS")
                results["failed_calls"] = failures
                results["authorizer_fetches"] = after["authorizer_fetches"] - before["authorizer_fetches"]
                results["authorizers_fetched"] = after["authorizers_fetched"] - before["authorizers_fetched"]
                results["rss_before_mib"] = round(rss_before / 1024, 1)
                results["rss_after_mib"] = round(rss_after / 1024, 1)
                results["rss_per_cached_authorizer_kib"] = round((rss_after - rss_before) / args.used, 2)

                # Latency: one connection, cached authorizer and app call
                # interleaved; rounds, each its own p99 ratio, the median kept.
                ratios, authorizer, app = [], [], []
                async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as one:
                    for _ in range(args.latency_rounds):
                        round_a, round_b = [], []
                        for i in range(args.latency_calls):
                            # Both URLs new each time: the client caches parsed URLs,
                            # which would favour a URL repeated over one that varies.
                            url_a = f"{sidecar.base}/plat/wx{i % args.used:016x}/cgi-bin/user/info?openid=o{i}"
                            url_b = f"{sidecar.base}/mp/cgi-bin/user/info?openid=o{i}"
                            first, second = (url_a, url_b) if i % 2 == 0 else (url_b, url_a)
                            t1, t2 = await timed(one, first), await timed(one, second)
                            round_a.append(t1 if first is url_a else t2)
                            round_b.append(t2 if first is url_a else t1)
                        ratios.append(pct(round_a, 0.99) / pct(round_b, 0.99))
                        authorizer += round_a
                        app += round_b
                results["authorizer_call_ms"] = {"p50": round(pct(authorizer, 0.5) * 1000, 3),
                                                 "p99": round(pct(authorizer, 0.99) * 1000, 3)}
                results["app_call_ms"] = {"p50": round(pct(app, 0.5) * 1000, 3), "p99": round(pct(app, 0.99) * 1000, 3)}
                results["p99_ratio_per_round"] = [round(r, 3) for r in ratios]
                results["p99_ratio"] = round(statistics.median(ratios), 3)
                after_latency = await sim_stats(http, sim)
                results["fetches_during_latency_run"] = (after_latency["authorizer_fetches"]
                                                         - after["authorizer_fetches"])
                sidecar.stop()
                sidecar = None

                # Start-up with the 100,000 authorizers in Redis and with none
                # (another key prefix, same server), one after the other in turn.
                empty_path = config(tmp, port, admin, sim, redis_port, prefix="empty:")
                empty, full = [], []
                for _ in range(args.starts):
                    empty += await start_times(http, empty_path, port, admin, log, 1)
                    full += await start_times(http, path, port, admin, log, 1)
                results["startup_empty_redis_s"] = round(statistics.median(empty), 3)
                results["startup_with_authorizers_s"] = round(statistics.median(full), 3)
                sidecar = Sidecar(path, port, admin, log)
                await sidecar.ready(http)
                served = 0
                for n in range(0, args.used, max(1, args.used // 100)):
                    async with http.get(f"{sidecar.base}/plat/wx{n:016x}/cgi-bin/user/info") as resp:
                        served += resp.status == 200
                restarted = await sim_stats(http, sim)
                results["after_restart"] = {"calls_ok": served,
                                            "fetches": restarted["authorizer_fetches"] - after_latency["authorizer_fetches"]}
        finally:
            if sidecar is not None:
                sidecar.stop()
            stop(sim_proc)
            stop(redis)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--authorizers", type=int, default=100_000)
    parser.add_argument("--used", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--latency-calls", type=int, default=4000)
    parser.add_argument("--latency-rounds", type=int, default=5)
    parser.add_argument("--starts", type=int, default=7)
    args = parser.parse_args()
    results = asyncio.run(run(args))
    print(json.dumps(results, indent=2))
    checks = {
        "one fetch per used authorizer": results["authorizer_fetches"] == results["authorizers_fetched"] == args.used,
        "no failed call": results["failed_calls"] == 0,
        "cached-authorizer p99 within 10 % of an app call": results["p99_ratio"] <= 1.10,
        "start-up unchanged by the authorizers in Redis (within 10 %)":
            results["startup_with_authorizers_s"] <= results["startup_empty_redis_s"] * 1.10,
        "a restarted sidecar fetches nothing": results["after_restart"]["fetches"] == 0,
    }
    for name, met in checks.items():
        print(f"{'met    ' if met else 'MISSED '} {name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
